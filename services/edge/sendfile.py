"""Send a local file as a response body, with the kernel's sendfile(2) or a plain copy.

`loop.sendfile` is not implemented by uvloop (the edge's loop), and aiohttp's
`FileResponse` then falls back to reading the file into memory chunk by chunk. Here the
response headers go out through aiohttp as usual; once the transport has flushed them,
the body goes to the socket by non-blocking `os.sendfile` calls (from the page cache,
without a copy), waiting for the socket to be writable in between, the way nginx does it.

Zero copy pays off when the bytes leave the machine. When the client is on the same host
(loopback, a container's veth), the receiving process must then copy out of page-cache
pages the kernel lent to the socket, which costs it about twice the CPU per byte of data
we copied ourselves; `zero_copy=False` sends through a buffer instead (`preadv` + `write`).

The socket is used through a duplicate descriptor: if aiohttp closes the connection
meanwhile, the duplicate keeps the socket itself open, so its number can never be
reused by another connection while we write to it. The duplicate is also what we wait
on: epoll accepts a second descriptor of a socket the loop already watches. Reads from
the file happen on the event loop: they come from the page cache for hot blobs, which is
what this tier holds.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import structlog
from aiohttp import web

log = structlog.get_logger("edge")
OnSent = Callable[[int], None]

# Per connection, when copying: large enough that the Python overhead per call vanishes
# (P2, 8 loopback connections: 256 KiB gave 1954-2495 MiB/s, 1 MiB 2969-3381 MiB/s).
COPY_BUFFER = 1024 * 1024


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
    on_sent: OnSent,
    *,
    zero_copy: bool = True,
) -> web.StreamResponse:
    """Answer with `length` bytes of the open file `fd` from `offset`.

    A failure after the headers went out can only cut the connection, which the client
    sees as a truncated (and therefore rejected) blob.
    """
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = length
    await response.prepare(request)
    transport = request.transport
    if transport is not None and transport.get_extra_info("sslcontext") is not None:
        return await _send_encrypted(request, response, fd, offset, length, on_sent)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if transport is None or sock is None:
        return response  # the client is already gone
    loop = asyncio.get_running_loop()
    out = os.dup(sock.fileno())
    try:
        # What aiohttp wrote (the headers) must be on the wire before the body.
        while transport.get_write_buffer_size():
            await _writable(loop, out)
        send = _send_zero_copy if zero_copy else _send_copied
        await send(loop, out, fd, offset, length, on_sent)
    except ConnectionError as exc:  # the client went away: nothing wrong here
        log.info("blob_client_gone", path=request.path, reason=str(exc))
        transport.abort()
        return response
    except (OSError, EOFError) as exc:
        log.warning("blob_send_aborted", path=request.path, reason=str(exc))
        transport.abort()
        return response
    finally:
        os.close(out)
    await response.write_eof()
    return response


async def _send_encrypted(
    request: web.Request,
    response: web.StreamResponse,
    fd: int,
    offset: int,
    length: int,
    on_sent: OnSent,
) -> web.StreamResponse:
    """Over TLS the body goes through aiohttp's writer: bytes written to the socket itself
    would bypass the encryption (and break the connection)."""
    sent = 0
    try:
        while sent < length:
            chunk = os.pread(fd, min(COPY_BUFFER, length - sent), offset + sent)
            if not chunk:
                raise EOFError(f"file ended {length - sent} bytes early")
            await response.write(chunk)
            sent += len(chunk)
            on_sent(len(chunk))
    except ConnectionError as exc:
        log.info("blob_client_gone", path=request.path, reason=str(exc))
        return response
    except (OSError, EOFError) as exc:
        cut_off(request, "blob_send_aborted", exc)
        return response
    await response.write_eof()
    return response


def cut_off(request: web.Request, event: str, reason: BaseException) -> None:
    """End a response whose headers went out and whose body cannot be completed: the client
    sees a truncated body, which it rejects, rather than a short one it might accept."""
    log.warning(event, path=request.path, reason=str(reason))
    if request.transport is not None:
        request.transport.abort()


async def _send_zero_copy(
    loop: asyncio.AbstractEventLoop,
    out: int,
    fd: int,
    offset: int,
    length: int,
    on_sent: OnSent,
) -> None:
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


async def _send_copied(
    loop: asyncio.AbstractEventLoop,
    out: int,
    fd: int,
    offset: int,
    length: int,
    on_sent: OnSent,
) -> None:
    buffer = memoryview(bytearray(COPY_BUFFER))
    pending = buffer[:0]
    sent = 0
    while sent < length:
        if not pending:
            count = os.preadv(fd, [buffer[: min(COPY_BUFFER, length - sent)]], offset + sent)
            if count == 0:
                raise EOFError(f"file ended {length - sent} bytes early")
            pending = buffer[:count]
        try:
            count = os.write(out, pending)
        except BlockingIOError:
            count = 0
        pending = pending[count:]
        sent += count
        if count:
            on_sent(count)
        if pending:
            await _writable(loop, out)
        elif sent < length:
            await asyncio.sleep(0)  # the socket took it all: still let other connections run


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
