"""The edge's listening sockets: the registry site (TLS, connection limits) and the metrics
site, started and stopped together. `python -m services.edge` and the tests both use it."""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Callable

from aiohttp import web

from services.edge import keys
from services.edge.app import create_app
from services.edge.hot import HotAnswers
from services.edge.limits import ConnectionGuard, GuardedConnection
from services.edge.ops import metrics_app
from services.edge.tls import CertificateReloader
from shared.logging import get_logger
from shared.metrics import EDGE_PROCESSES
from shared.settings import Settings

log = get_logger("edge")


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (`[::1]:port` for IPv6) as a (host, port) pair; an empty host is 127.0.0.1."""
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a `ConnectionGuard` (aiohttp's TCPSite
    hands the runner's server to the loop directly, with no place for one)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        *,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host = host
        self._port = port
        self._guard = guard
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        factory: Callable[[], GuardedConnection] = self._guard.protocol_factory(server)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            factory,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_port=self._reuse_port or None,
            # The TLS handshake comes before any header: bound it the same way.
            ssl_handshake_timeout=self._guard.header_timeout if self._ssl_context else None,
        )


class EdgeSites:
    """A running edge: the registry app on `listen`, its metrics on `metrics_listen`."""

    def __init__(self, settings: Settings) -> None:
        if settings.tls is not None and (settings.public_url or "").startswith("http://"):
            raise ValueError(
                f"public_url {settings.public_url!r} says http, but the edge serves TLS (tls:): "
                "clients would be sent to a plain-HTTP token realm; use https://"
            )
        self.settings = settings
        self._registry: web.AppRunner | None = None
        self._metrics: web.AppRunner | None = None
        self._certificates: CertificateReloader | None = None

    async def start(self) -> None:
        settings = self.settings
        limits = settings.limits
        # `seawall up` starts `edge_processes` edges on the one port; the kernel spreads new
        # connections over them (each socket needs SO_REUSEPORT, and the same user).
        shared_port = settings.edge_processes > 1
        try:
            if settings.tls is not None:
                self._certificates = CertificateReloader(settings.tls)
            app = create_app(settings)
            self._registry = web.AppRunner(
                app, access_log=None, keepalive_timeout=limits.keepalive_timeout.total_seconds()
            )
            await self._registry.setup()
            server = self._registry.server
            assert server is not None
            # Repeats of a warm manifest answer skip routing and handling (services/edge/hot.py).
            server.request_handler = HotAnswers(app[keys.REPOSITORIES]).wrap(server.request_handler)
            host, port = split_address(settings.listen)
            await GuardedSite(
                self._registry,
                host,
                port,
                ConnectionGuard(limits),
                ssl_context=self._certificates.context if self._certificates else None,
                reuse_port=shared_port,
            ).start()
            if settings.metrics_listen:
                self._metrics = web.AppRunner(
                    metrics_app(app),
                    access_log=None,
                    keepalive_timeout=limits.keepalive_timeout.total_seconds(),
                )
                await self._metrics.setup()
                metrics_host, metrics_port = split_address(settings.metrics_listen)
                # With several edge processes on one host each binds the metrics port too,
                # and a scrape reaches one of them.
                await GuardedSite(
                    self._metrics, metrics_host, metrics_port, ConnectionGuard(limits), reuse_port=shared_port
                ).start()
            if self._certificates is not None:
                self._certificates.start()
        except BaseException:
            await self.stop()
            raise
        EDGE_PROCESSES.set(1)
        log.info(
            "edge_listening",
            listen=settings.listen,
            tls=settings.tls is not None,
            metrics_listen=settings.metrics_listen,
            metrics_on_registry_port=settings.metrics_on_registry_port,
        )

    async def stop(self) -> None:
        EDGE_PROCESSES.set(0)
        if self._certificates is not None:
            await self._certificates.stop()
        if self._metrics is not None:
            await self._metrics.cleanup()
            self._metrics = None
        if self._registry is not None:
            await self._registry.cleanup()
            self._registry = None


async def serve(settings: Settings) -> None:
    """Run the edge until SIGINT or SIGTERM, then stop it gracefully."""
    sites = EdgeSites(settings)
    await sites.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await stopping.wait()
        log.info("edge_stopping")
    finally:
        await sites.stop()
