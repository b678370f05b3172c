"""Send a local file as a response body with the kernel's sendfile(2), under any event loop.

`loop.sendfile` is not implemented by uvloop (the edge's loop), and aiohttp's
`FileResponse` then falls back to reading the file into memory chunk by chunk. Here the
response headers go out through aiohttp as usual; once the transport has flushed them,
the body goes from the page cache to the socket by non-blocking `os.sendfile` calls,
waiting for the socket to be writable in between, the way nginx does it.

The socket is used through a duplicate descriptor: if aiohttp closes the connection
meanwhile, the duplicate keeps the socket itself open, so its number can never be
reused by another connection while we write to it. The duplicate is also what we wait
on: epoll accepts a second descriptor of a socket the loop already watches.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import structlog
from aiohttp import web

log = structlog.get_logger("edge")


def can_sendfile(request: web.Request) -> bool:
    """Whether the request came over a socket we can sendfile to."""
    transport = request.transport
    return transport is not None and transport.get_extra_info("socket") is not None


async def send_file(
    request: web.Request,
    status: int,
    headers: dict[str, str],
    fd: int,
    offset: int,
    length: int,
    on_sent: Callable[[int], None],
) -> web.StreamResponse:
    """Answer with `length` bytes of the open file `fd` from `offset`.

    A failure after the headers went out can only cut the connection, which the client
    sees as a truncated (and therefore rejected) blob.
    """
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = length
    await response.prepare(request)
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if transport is None or sock is None:
        return response  # the client is already gone
    loop = asyncio.get_running_loop()
    out = os.dup(sock.fileno())
    try:
        # What aiohttp wrote (the headers) must be on the wire before the body.
        while transport.get_write_buffer_size():
            await _writable(loop, out)
        sent = 0
        while sent < length:
            try:
                count = os.sendfile(out, fd, offset + sent, length - sent)
            except BlockingIOError:
                count = None
            if count == 0:
                raise EOFError(f"file ended {length - sent} bytes early")
            if count:
                sent += count
                on_sent(count)
            if sent < length:
                # A partial send means the socket buffer is full: wait for room.
                await _writable(loop, out)
    except ConnectionError as exc:  # the client went away: nothing wrong here
        log.info("blob_client_gone", path=request.path, reason=str(exc))
        transport.abort()
        return response
    except (OSError, EOFError) as exc:
        log.warning("blob_sendfile_aborted", path=request.path, reason=str(exc))
        transport.abort()
        return response
    finally:
        os.close(out)
    await response.write_eof()
    return response


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    waiter = loop.create_future()
    loop.add_writer(fd, _wake, waiter)
    try:
        await waiter
    finally:
        loop.remove_writer(fd)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
