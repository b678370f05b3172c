"""Writing to an upstream (a replication destination): blobs in resumable, chunked upload
sessions, cross-repository mounts, manifests put and deleted.

A blob goes up as POST (open a session), PATCH per chunk with Content-Range, and a final
PUT `?digest=` carrying the last chunk. When the link breaks, the session's status (GET on
its Location: `Range: 0-<last byte>`) says where the destination stands, and the upload
continues from there with the source reopened at that offset. A new session is opened only
when the destination has dropped the old one: it answers 404, or, as CNCF Distribution
does when a chunk was cut midway (the part it wrote no longer matches the session's
state), BLOB_UPLOAD_INVALID, and then cancels it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from typing import NoReturn

import aiohttp
from yarl import URL

from shared.upstream.auth import Rechallenged, UpstreamAuth, pull_scope, push_scope
from shared.upstream.failures import UpstreamFailure, error_excerpt
from shared.upstream.transport import MAX_ERROR_BODY, Transport
from shared.upstream.upload_body import ChunkBody, Meter, OpenSource, SourceReader

DEFAULT_CHUNK = 8 * 1024 * 1024
# A chunk's request slower than this (bytes per second) on top of the read timeout is taken
# for a stalled link.
MIN_RATE = 64 * 1024
# Waits before each new try after an interruption that made no progress; once they are
# used up the last failure is raised.
RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0)
# The link broke or the destination had a passing fault: ask where the session stands.
_TRANSIENT_KINDS = frozenset({"network", "timeout", "refused"})
# The error codes of a session the destination no longer continues.
_SESSION_GONE = frozenset({"BLOB_UPLOAD_UNKNOWN", "BLOB_UPLOAD_INVALID"})


class _Trouble(Exception):
    """An interruption the upload survives: the session is asked where it stands, or, when
    `session_lost`, replaced."""

    def __init__(self, failure: UpstreamFailure, *, session_lost: bool = False) -> None:
        super().__init__(str(failure))
        self.failure = failure
        self.session_lost = session_lost


@dataclass
class _Session:
    location: URL
    offset: int  # bytes the destination holds


class Pushes:
    """Blob uploads, mounts and manifest writes to one upstream."""

    def __init__(self, transport: Transport, auth: UpstreamAuth) -> None:
        self._transport = transport
        self._auth = auth
        self._name = transport.name
        self._log = transport.log

    # ----------------------------------------------------------------- blobs
    async def mount_blob(self, repository: str, digest: str, from_repository: str) -> bool:
        """Mount a blob the destination holds in `from_repository`: True on 201; False when
        it opened an upload instead (which is cancelled) or cannot mount."""
        what = f"mount {digest} from {from_repository} into {repository}"
        url = self._uploads(repository).with_query({"mount": digest, "from": from_repository})
        scope = f"{push_scope(repository)} {pull_scope(from_repository)}"
        response = await self._auth.send(
            "POST", url, kind="upload", scope=scope, headers={"Content-Length": "0"}
        )
        try:
            if response.status == 201:
                return True
            if response.status != 202:
                if response.status in (400, 404, 405):
                    self._log.info("upstream_mount_refused", what=what, status=response.status)
                    await self._transport.discard(response)
                    return False
                await self._transport.raise_for_status(response, what)
            location = self._location(response, what)
        finally:
            response.release()
        await self._cancel(location, scope)
        return False

    async def push_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        open_source: OpenSource,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        bandwidth: int | None = None,
    ) -> int:
        """Upload a blob of `size` bytes from `open_source(offset)` in chunks; the bytes sent
        (more than `size` when part of it had to be sent again).

        A broken link or a destination fault is survived: the session's status says from
        where to go on. After RETRY_DELAYS are used up without progress, the last failure
        is raised. A source that fails raises its own exception.
        """
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        what = f"push blob {repository}@{digest}"
        scope = push_scope(repository)
        meter = Meter(bandwidth)
        session: _Session | None = None
        ask_status = False
        failures, progress = 0, -1
        while True:
            try:
                if session is not None and ask_status:
                    session = await self._status(session, scope, what)
                    ask_status = False
                    # A session gone after its last chunk went up may have been finished
                    # by it (the answer lost on the way back).
                    if session is None and await self._holds(repository, digest, scope, what):
                        return meter.sent
                if session is None:
                    session = await self._start(repository, scope, what)
                await self._upload(session, digest, size, open_source, chunk_size, meter, scope, what)
                return meter.sent
            except _Trouble as trouble:
                # Tries are counted from the last one that got further.
                offset = session.offset if session is not None else 0
                failures = 1 if offset > progress else failures + 1
                progress = offset
                if failures > len(RETRY_DELAYS):
                    raise trouble.failure from trouble
                self._log.info(
                    "upstream_push_interrupted",
                    what=what,
                    offset=offset,
                    error=trouble.failure.message,
                    session_lost=trouble.session_lost,
                    attempt=failures,
                )
                await asyncio.sleep(RETRY_DELAYS[failures - 1])
                if trouble.session_lost:
                    session = None
                elif session is not None:
                    ask_status = True

    async def _start(self, repository: str, scope: str, what: str) -> _Session:
        response = await self._send(
            "POST", self._uploads(repository), scope, {"Content-Length": "0"}, kind="upload"
        )
        try:
            if response.status != 202:
                await self._unexpected(response, f"{what}: open session", in_session=False)
            return _Session(self._location(response, what), 0)
        finally:
            response.release()

    async def _status(self, session: _Session, scope: str, what: str) -> _Session | None:
        """Where the destination stands in the session (its Location may change too); None
        when it has dropped the session."""
        response = await self._send("GET", session.location, scope, {}, kind="upload")
        try:
            if response.status not in (200, 204):
                await self._unexpected(response, f"{what}: session status", in_session=True)
            offset = _range_end(response.headers.get("Range"))
            if offset is None:
                self._log.info(
                    "upstream_upload_status_unusable", what=what, range=response.headers.get("Range")
                )
                return None
            return _Session(self._location(response, what, default=session.location), offset)
        except _Trouble as trouble:
            if trouble.session_lost:
                return None
            raise
        finally:
            response.release()

    async def _upload(
        self,
        session: _Session,
        digest: str,
        size: int,
        open_source: OpenSource,
        chunk_size: int,
        meter: Meter,
        scope: str,
        what: str,
    ) -> None:
        """The rest of the blob from `session.offset`: PATCH chunks, then the final PUT."""
        if session.offset > size:
            failure = self._failure(f"{what}: the session holds {session.offset} of {size} bytes")
            raise _Trouble(failure, session_lost=True)
        async with open_source(session.offset) as chunks:
            reader = SourceReader(chunks)
            while True:
                start = session.offset
                length = min(chunk_size, size - start)
                final = start + length >= size
                headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
                if length:
                    headers["Content-Range"] = f"{start}-{start + length - 1}"
                body = ChunkBody(reader, length, meter, what)
                url = _with_digest(session.location, digest) if final else session.location
                bound = self._chunk_bound(length, meter)
                try:
                    async with asyncio.timeout(bound):
                        response = await self._send(
                            "PUT" if final else "PATCH",
                            url,
                            scope,
                            headers,
                            kind="upload",
                            data=body if length else None,
                        )
                except (_Trouble, UpstreamFailure, TimeoutError) as exc:
                    if body.error is not None:
                        raise body.error from None
                    if isinstance(exc, TimeoutError):
                        message = f"{what}: the chunk at {start} was not taken within {bound:g} s"
                        failure = UpstreamFailure("timeout", message, upstream=self._name)
                        raise _Trouble(failure) from exc
                    raise
                try:
                    if final:
                        if response.status not in (200, 201, 204):
                            await self._unexpected(response, f"{what}: finish", in_session=True)
                        stored = response.headers.get("Docker-Content-Digest")
                        if stored and stored != digest:
                            raise self._failure(
                                f"{what}: the destination stored it as {stored}", response.status
                            )
                        return
                    if response.status != 202:
                        await self._unexpected(response, f"{what}: chunk at {start}", in_session=True)
                    session.location = self._location(response, what, default=session.location)
                    reported = _range_end(response.headers.get("Range"))
                finally:
                    response.release()
                session.offset = start + length
                if reported is not None and reported != session.offset:
                    # The destination took another amount than was sent: go on from its count.
                    session.offset = reported
                    message = f"{what}: sent up to {start + length}, the destination holds {reported}"
                    raise _Trouble(self._failure(message, 202))

    async def _holds(self, repository: str, digest: str, scope: str, what: str) -> bool:
        """Whether the destination has the blob (a session whose answer was lost may have
        finished it)."""
        url = self._transport.url(repository, "blobs", digest)
        response = await self._send("HEAD", url, scope, {"Accept": "*/*"}, kind="blob")
        try:
            if response.status == 404:
                return False
            if response.status != 200:
                await self._unexpected(response, f"{what}: HEAD", in_session=False)
            return True
        finally:
            response.release()

    async def _cancel(self, location: URL, scope: str) -> None:
        """Cancel an upload session we do not use (best effort: it expires anyway)."""
        try:
            response = await self._auth.send("DELETE", location, kind="upload", scope=scope, headers={})
        except UpstreamFailure as failure:
            self._log.info("upstream_upload_cancel_failed", error=failure.message)
            return
        await self._transport.discard(response)

    # ------------------------------------------------------------- manifests
    async def put_manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> str:
        """Store a manifest's exact bytes under `reference` (a tag or its digest); its digest."""
        what = f"PUT manifest {repository}:{reference}"
        url = self._transport.url(repository, "manifests", reference)
        response = await self._auth.send(
            "PUT",
            url,
            kind="manifest",
            scope=push_scope(repository),
            headers={"Content-Type": media_type},
            data=body,
        )
        try:
            if not 200 <= response.status < 300:
                await self._transport.raise_for_status(response, what)
            stored = response.headers.get("Docker-Content-Digest")
            status = response.status
        finally:
            response.release()
        computed = "sha256:" + hashlib.sha256(body).hexdigest()
        if stored and stored.startswith("sha256:") and stored != computed:
            raise self._failure(f"{what}: the destination stored it as {stored}, not {computed}", status)
        return stored or computed

    async def delete_manifest(self, repository: str, reference: str) -> bool:
        """Delete a manifest (by digest; by tag where the destination allows it): False on 404."""
        what = f"DELETE manifest {repository}:{reference}"
        url = self._transport.url(repository, "manifests", reference)
        response = await self._auth.send(
            "DELETE", url, kind="manifest", scope=f"repository:{repository}:delete", headers={}
        )
        try:
            if response.status == 404:
                return False
            if not 200 <= response.status < 300:
                await self._transport.raise_for_status(response, what)
            return True
        finally:
            response.release()

    # ---------------------------------------------------------------- helpers
    def _chunk_bound(self, length: int, meter: Meter) -> float:
        """How long one chunk's request may take: its bytes at MIN_RATE (or at the
        bandwidth cap, when lower) and the upstream's read timeout for the answer, so
        that a destination that stops reading is noticed."""
        rate = MIN_RATE if meter.rate is None else min(MIN_RATE, meter.rate)
        return length / rate + self._transport.upstream.read_timeout.total_seconds()

    def _uploads(self, repository: str) -> URL:
        return URL(f"{self._transport.base_url}/v2/{repository}/blobs/uploads/")

    def _failure(self, message: str, status: int | None = None) -> UpstreamFailure:
        return UpstreamFailure("status", message, upstream=self._name, status=status)

    async def _send(
        self, method: str, url: URL, scope: str, headers: dict[str, str], *, kind: str, data: object = None
    ) -> aiohttp.ClientResponse:
        """A request of the upload; a broken link (or a challenge to a streamed body) is a
        _Trouble the upload survives."""
        try:
            return await self._auth.send(method, url, kind=kind, scope=scope, headers=headers, data=data)
        except Rechallenged as exc:
            raise _Trouble(UpstreamFailure("auth", str(exc), upstream=self._name, status=401)) from exc
        except UpstreamFailure as failure:
            if failure.kind in _TRANSIENT_KINDS:
                raise _Trouble(failure) from failure
            raise

    async def _unexpected(self, response: aiohttp.ClientResponse, what: str, *, in_session: bool) -> NoReturn:
        """Raise for an unwanted answer: a fault the upload survives as _Trouble (5xx, 416;
        in a session also 404 and a session-gone error code), anything else as it is."""
        status = response.status
        if status in (401, 429):
            await self._transport.raise_for_status(response, what)
        body = await self._transport.read_limited(response, MAX_ERROR_BODY, what)
        failure = self._failure(f"{what}: {status}{error_excerpt(body)}", status)
        if in_session and (status == 404 or _error_code(body) in _SESSION_GONE):
            raise _Trouble(failure, session_lost=True)
        if status >= 500 or status == 416:
            raise _Trouble(failure)
        raise failure

    def _location(self, response: aiohttp.ClientResponse, what: str, default: URL | None = None) -> URL:
        """The session URL an answer names, kept on this upstream's origin.

        The registry's own encoding of its query (Distribution's signed `_state`) is kept
        as sent. An absolute Location on this upstream's host is taken on our scheme and
        port (a registry behind a TLS proxy may not know them); another host is refused:
        the upload's credentials go nowhere else.
        """
        raw = response.headers.get("Location")
        if not raw:
            if default is not None:
                return default
            raise self._failure(f"{what}: {response.status} without a Location", response.status)
        base = URL(self._transport.base_url)
        if raw.startswith(("http://", "https://")):
            target = URL(raw, encoded=True)
            if target.host != base.host:
                raise self._failure(f"{what}: the upload session is on another host ({target.host})")
            raw = target.raw_path_qs
        if raw.startswith("/"):
            return URL(f"{base.origin()}{raw}", encoded=True)
        return response.url.join(URL(raw, encoded=True))


def _with_digest(location: URL, digest: str) -> URL:
    """The session URL with `digest=` added to whatever query it carries."""
    text = str(location)
    return URL(f"{text}{'&' if location.raw_query_string else '?'}digest={digest}", encoded=True)


def _range_end(value: str | None) -> int | None:
    """The byte count a session's `Range: 0-<last>` reports (`0-0` counts as empty, as
    registries report an empty session); None when there is no usable one."""
    if not value:
        return None
    text = value.strip().removeprefix("bytes=").strip()
    first, dash, last = text.partition("-")
    if not dash or not first.isdigit() or not last.isdigit() or int(first) != 0:
        return None
    end = int(last)
    return 0 if end == 0 else end + 1


def _error_code(body: bytes) -> str | None:
    """The first OCI error code of an error envelope."""
    try:
        document = json.loads(body)
        code = document["errors"][0]["code"]
    except (ValueError, RecursionError, KeyError, IndexError, TypeError):
        return None
    return code if isinstance(code, str) else None
