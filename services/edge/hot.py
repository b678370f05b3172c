"""Warm manifest answers repeated for a moment, in front of routing, middleware and handler.

A pull storm asks the same edge for the same manifest many times a second, and each ask was
answered by the same lookups from this process's memory (`shared/localcache.py`). Here the
answer itself is kept: a repeat of the same request, within the life of what it was built
from, gets the same status, headers and body, with a request id of its own, without being
routed, authenticated or handled again. The handler's side effects still happen per request:
the request is counted and timed, and the pull is noted for eviction and retention.

An answer is kept only when all of these hold, so a repeat answers exactly what the handler
would:

- the handler marked it repeatable (`keys.REPEAT`): a 200 to a manifest GET or HEAD that is
  a hit, of a hosted project or of a cached tag inside its TTL;
- every lookup it made came from an in-process entry, and nothing from Redis, the bucket
  or a fresh login (`shared/validity.py`);
- the request is the same: method, path with query, and the Authorization header. A token
  or a cached login is itself one of the things the answer depends on.

It is kept until the earliest of those entries expires (at most `LOCAL_TTL_SECONDS`, and
never past the Redis entries they came from), and dropped as soon as this process writes to
its repositories (a push or a revalidation here is served at once). So the cross-edge
guarantee is unchanged: a change made elsewhere is seen here within max(1 s, a Redis
entry's 1.5 s) plus a bucket read.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from services.edge import keys
from services.edge.middleware import new_request_id, request_timer
from shared import validity
from shared.registry.repositories import RepositoryStore

_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# Bounds the memory: manifests are a few KiB; a big index is answered the usual way.
MAX_ENTRIES = 1024
MAX_BODY_BYTES = 64 * 1024


@dataclass(slots=True)
class _Kept:
    status: int
    headers: dict[str, str]  # without the request id
    body: bytes | None
    repeat: Callable[[], None]
    timer: Any
    writes: int  # the repositories' write count when the handler began
    until: float  # time.monotonic()


class HotAnswers:
    def __init__(self, repositories: RepositoryStore) -> None:
        self._repositories = repositories
        self._kept: dict[tuple[str, str, str | None], _Kept] = {}

    def wrap(self, handler: _Handler) -> _Handler:
        """`handler` (a web.Server's request handler), answering repeats from what is kept."""

        async def answer(request: web.BaseRequest) -> web.StreamResponse:
            method = request.method
            if method != "GET" and method != "HEAD":
                return await handler(request)
            key = (method, request.raw_path, request.headers.get("Authorization"))
            kept = self._kept.get(key)
            if kept is not None:
                if kept.until > time.monotonic() and kept.writes == self._repositories.writes:
                    return _repeat(request, kept)
                self._kept.pop(key, None)
            writes = self._repositories.writes
            tracked, token = validity.track()
            try:
                response = await handler(request)
            finally:
                validity.untrack(token)
            repeat = request.get(keys.REPEAT)
            if repeat is not None:
                self._keep(key, request, response, repeat, writes, tracked)
            return response

        return answer

    def _keep(
        self,
        key: tuple[str, str, str | None],
        request: web.BaseRequest,
        response: web.StreamResponse,
        repeat: Callable[[], None],
        writes: int,
        tracked: validity.Validity,
    ) -> None:
        now = time.monotonic()
        seconds = tracked.keepable_for(now)
        if seconds <= 0 or writes != self._repositories.writes:
            return
        if not isinstance(response, web.Response) or response.prepared or response.status != 200:
            return
        body = response.body
        if body is not None and (not isinstance(body, bytes) or len(body) > MAX_BODY_BYTES):
            return
        headers = {name: value for name, value in response.headers.items() if name != "X-Request-Id"}
        route = request.match_info.route.name if isinstance(request, web.Request) else None
        if len(self._kept) >= MAX_ENTRIES:
            self._expire(now)
            if len(self._kept) >= MAX_ENTRIES:
                del self._kept[next(iter(self._kept))]
        self._kept[key] = _Kept(
            200, headers, body, repeat, request_timer(route or "other", request.method), writes, now + seconds
        )

    def _expire(self, now: float) -> None:
        for key in [key for key, kept in self._kept.items() if kept.until <= now]:
            del self._kept[key]


def _repeat(request: web.BaseRequest, kept: _Kept) -> web.Response:
    started = time.perf_counter()
    kept.repeat()
    headers = {**kept.headers, "X-Request-Id": new_request_id(request)}
    response = web.Response(status=kept.status, body=kept.body, headers=headers)
    kept.timer.observe(time.perf_counter() - started)
    return response
