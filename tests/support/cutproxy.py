"""A TCP proxy on 127.0.0.1 that forwards to a target and cuts the link on demand: once a
given number of bytes has gone towards the target, every open connection is reset, as a
broken link would be. It runs on the caller's event loop:

    async with CuttingProxy(port) as proxy:
        proxy.cut_after(10 * MiB)
        ...  # talk to proxy.url
        assert proxy.cuts == 1
"""

from __future__ import annotations

import asyncio
import contextlib

PIECE = 64 * 1024


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to `target_host:target_port`, counting what goes each way."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.to_target = 0  # bytes forwarded towards the target, all connections together
        self.cuts = 0
        self._cut_at: int | None = None
        self._every: int | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut_after(self, nbytes: int, *, every: bool = False) -> None:
        """Reset every connection once `nbytes` more have gone towards the target; with
        `every`, again after each further `nbytes`."""
        self._cut_at = self.to_target + nbytes
        self._every = nbytes if every else None

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        self._reset_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                target_reader, target_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                client_writer.transport.abort()
                return
            self._writers.update((client_writer, target_writer))
            try:
                await asyncio.gather(
                    self._pump(client_reader, target_writer, towards_target=True),
                    self._pump(target_reader, client_writer, towards_target=False),
                )
            finally:
                for writer in (client_writer, target_writer):
                    self._writers.discard(writer)
                    writer.close()
        finally:
            self._tasks.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, towards_target: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(PIECE):
                if towards_target and self._cut_at is not None and self.to_target + len(data) >= self._cut_at:
                    data = data[: self._cut_at - self.to_target]
                    writer.write(data)
                    self.to_target += len(data)
                    with contextlib.suppress(ConnectionError, OSError):
                        await writer.drain()
                    self.cuts += 1
                    self._cut_at = self.to_target + self._every if self._every else None
                    self._reset_all()
                    return
                writer.write(data)
                if towards_target:
                    self.to_target += len(data)
                await writer.drain()
        # One side closed: so does the other, after what it has been sent.
        writer.close()

    def _reset_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
