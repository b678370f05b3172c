"""Native TLS for the edge: the certificate and key of `tls:`, re-read when the files change.

The listening socket keeps one SSLContext for its whole life. Its SNI callback, which
OpenSSL runs on every ClientHello (with or without a server name), moves each new
handshake onto the newest good context. A renewal is loaded into a fresh context off to
the side and only then made current, so a half-written or mismatched pair never reaches a
handshake: it is logged, and the previous certificate stays in use until both files are
right. Connections already open keep the certificate they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from pathlib import Path

from shared.logging import get_logger
from shared.settings import TLSSettings

log = get_logger("edge")

# How often the files' metadata is checked; a renewed certificate is served within this.
CERT_POLL_SECONDS = 2.0

_Signature = tuple[tuple[int, int, int, int], ...]


def _load(tls: TLSSettings) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Checks that the key belongs to the certificate (raises ssl.SSLError otherwise).
    context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def _signature(paths: tuple[Path, ...]) -> _Signature | None:
    """What identifies the files' current content (None while one is missing)."""
    try:
        stats = [os.stat(path) for path in paths]
    except OSError:
        return None
    return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


class CertificateReloader:
    """The server SSLContext of `tls:` and the task that keeps its certificate current."""

    def __init__(self, tls: TLSSettings, poll_seconds: float = CERT_POLL_SECONDS) -> None:
        self._tls = tls
        self._paths = (tls.cert_file, tls.key_file)
        self._poll_seconds = poll_seconds
        self._seen = _signature(self._paths)
        # A bad pair at start is an error to fix, not something to serve around.
        self._current = _load(tls)
        self.context = _load(tls)
        self.context.sni_callback = self._select
        self._task: asyncio.Task[None] | None = None
        log.info("tls_certificate_loaded", cert_file=str(tls.cert_file))

    def _select(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        connection.context = self._current

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="tls-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            await self.reload_if_changed()

    async def reload_if_changed(self) -> bool:
        """Load the files if they changed since the last attempt; True if now served."""
        signature = await asyncio.to_thread(_signature, self._paths)
        if signature is None or signature == self._seen:
            return False
        # Remembered even if the load fails: a broken pair is reported once, and tried
        # again when either file changes.
        self._seen = signature
        try:
            fresh = await asyncio.to_thread(_load, self._tls)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error(
                "tls_reload_failed",
                cert_file=str(self._tls.cert_file),
                key_file=str(self._tls.key_file),
                error=str(exc),
                keeping="the previous certificate",
            )
            return False
        self._current = fresh
        log.info("tls_certificate_loaded", cert_file=str(self._tls.cert_file))
        return True
