"""Per-request helpers shared by the resource handlers: target resolution and body sources."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from services.edge import keys
from shared.auth.access import Action
from shared.oci.errors import RegistryError
from shared.registry.blobs import Source
from shared.routing import ProjectUnknown, Target, resolve


def target(request: web.Request, action: Action, name: str | None = None) -> Target:
    """Resolve the repository named by the request and check the caller may `action` it."""
    app = request.app
    requested = name or request.match_info["name"]
    if name is None and not request.rel_url.path_safe.startswith(f"/v2/{requested}/"):
        # aiohttp decodes `%2F` in path parameters, which would turn `local%2Fapp` into
        # `local/app`: an encoded slash is never a separator, and no component holds one.
        raise RegistryError("NAME_INVALID", f"invalid repository name {requested[:300]!r}")
    access, user = app[keys.ACCESS], request.get(keys.USER)
    try:
        resolved = resolve(app[keys.SETTINGS], requested, request.query.get("ns"))
    except ProjectUnknown:
        # Told apart from a private project the caller may not use, this would list them.
        raise access.refusal(user, action) from None
    access.require(user, resolved.project, action)
    if action is not Action.PULL and resolved.project.type == "proxy":
        raise RegistryError(
            "DENIED" if action is Action.PUSH else "UNSUPPORTED",
            f"project {resolved.project.name!r} is a read-only cache of its upstream",
        )
    return resolved


def body_source(request: web.Request) -> Source:
    """The request body as a byte source; a client that stops short is SIZE_INVALID, one
    that sends nothing for `limits.body_idle_timeout` is cut off (BLOB_UPLOAD_INVALID)."""
    idle = request.app[keys.SETTINGS].limits.body_idle_timeout.total_seconds()

    async def read(n: int) -> bytes:
        try:
            async with asyncio.timeout(idle):
                return await request.content.read(n)
        except TimeoutError:
            raise RegistryError(
                "BLOB_UPLOAD_INVALID", f"request body stalled: nothing received for {idle:g} s"
            ) from None
        except (HttpProcessingError, ConnectionError) as exc:
            raise RegistryError("SIZE_INVALID", f"request body ended early: {exc}") from None

    return read


def content_length(request: web.Request) -> int | None:
    raw = request.headers.get("Content-Length")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
        raise RegistryError("SIZE_INVALID", "Content-Length must be a non-negative integer")
    return int(raw)
