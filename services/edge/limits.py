"""Per-connection limits aiohttp does not have: a header read timeout and a cap on open
connections per client address.

Each accepted connection gets a `GuardedConnection`, a thin asyncio protocol in front of
aiohttp's own `RequestHandler` (made by the runner's `web.Server`, as aiohttp would make
it). It forwards every protocol call, and adds:

- the header timer: armed when the connection opens, and on a kept-alive connection when
  the first byte of the next request arrives; disarmed when aiohttp hands a request to the
  application (its request line and headers are complete). When it fires, the connection is
  aborted. Idle time between requests is aiohttp's `keepalive_timeout`, and a request body
  is watched by `body_source` (services/edge/context.py);
- the per-client cap: a connection past `max_connections_per_client` from one address is
  aborted before aiohttp sees it; the slot is given back when a connection closes.

The start and end of each request are seen by wrapping the server's request handler
(`web.Server.request_handler`, which every `RequestHandler` calls), so no private part of
aiohttp is touched.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from shared.logging import get_logger
from shared.settings import EdgeLimits

log = get_logger("edge")

_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class ConnectionGuard:
    """The limits shared by every connection of one listening site."""

    def __init__(self, limits: EdgeLimits) -> None:
        self.header_timeout = limits.header_timeout.total_seconds()
        self.max_per_client = limits.max_connections_per_client
        self._open: Counter[str] = Counter()
        self._capped: set[str] = set()
        self._by_transport: dict[asyncio.BaseTransport, GuardedConnection] = {}

    def admit(self, client: str) -> bool:
        """Count a new connection from `client`, unless it already holds its share."""
        if self.max_per_client and self._open[client] >= self.max_per_client:
            if client not in self._capped:
                # Logged once per episode: a client hammering the cap must not flood the log.
                self._capped.add(client)
                log.warning("client_connection_cap", client=client, cap=self.max_per_client)
            return False
        self._open[client] += 1
        return True

    def release(self, client: str) -> None:
        self._open[client] -= 1
        if self._open[client] <= 0:
            del self._open[client]
        self._capped.discard(client)

    def track(self, transport: asyncio.BaseTransport, connection: GuardedConnection) -> None:
        self._by_transport[transport] = connection

    def forget(self, transport: asyncio.BaseTransport) -> None:
        self._by_transport.pop(transport, None)

    def protocol_factory(self, server: web.Server) -> Callable[[], GuardedConnection]:
        """The factory to give `loop.create_server` in place of `server` itself."""
        server.request_handler = self._track_requests(server.request_handler)

        def make() -> GuardedConnection:
            return GuardedConnection(server, self)

        return make

    def _track_requests(self, handler: _Handler) -> _Handler:
        async def tracked(request: web.BaseRequest) -> web.StreamResponse:
            transport = request.transport
            connection = self._by_transport.get(transport) if transport is not None else None
            if connection is not None:
                connection.request_started()
            try:
                return await handler(request)
            finally:
                if connection is not None:
                    connection.request_finished()

        return tracked


def _client_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""  # a Unix socket or a transport that does not say: one shared bucket


class GuardedConnection(asyncio.Protocol):
    """aiohttp's RequestHandler for one connection, behind the header timer and the cap."""

    def __init__(self, server: web.Server, guard: ConnectionGuard) -> None:
        self._server = server
        self._guard = guard
        self._handler: RequestHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._client: str | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._in_request = False

    # ------------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        transport = cast(asyncio.Transport, transport)
        client = _client_of(transport)
        if not self._guard.admit(client):
            transport.abort()
            return
        self._client = client
        self._transport = transport
        self._guard.track(transport, self)
        self._arm_header_timer()
        self._handler = self._server()
        self._handler.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        if self._transport is not None:
            self._guard.forget(self._transport)
        if self._client is not None:
            self._guard.release(self._client)
            self._client = None
        if self._handler is not None:
            self._handler.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._handler is None:
            return
        if not self._in_request and self._header_timer is None:
            # The first byte of the next request on a kept-alive connection.
            self._arm_header_timer()
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        if self._handler is None:
            return None
        # Whatever aiohttp answers (today None: the transport closes itself).
        keep_open: bool | None = self._handler.eof_received()  # type: ignore[func-returns-value]
        return keep_open

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    # ------------------------------------------------------------------ request lifecycle

    def request_started(self) -> None:
        """aiohttp parsed a request's line and headers and hands it to the application."""
        self._in_request = True
        self._disarm_header_timer()

    def request_finished(self) -> None:
        # The timer is armed again by the next request's first byte (pipelined bytes that
        # arrived during this request are bounded by aiohttp's keep-alive timeout instead).
        self._in_request = False

    def _arm_header_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._header_timer = loop.call_later(self._guard.header_timeout, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._in_request or self._transport is None:
            return
        log.debug("header_timeout", client=self._client, seconds=self._guard.header_timeout)
        # abort, not close: a TLS close would wait for the client's close_notify.
        self._transport.abort()
