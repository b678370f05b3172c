"""Middlewares: request ids and logging context, authentication, OCI error envelopes, metrics."""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from services.edge import keys
from shared.auth.tokens import TOKEN_SERVICE
from shared.metrics import ERRORS, REQUEST_SECONDS
from shared.oci.errors import RegistryError
from shared.registry.storage import StorageUnavailable

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = structlog.get_logger("edge")

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}

# Request ids: a random prefix per process and a counter, unique without a random draw per
# request (uuid4 was one of the larger costs of a warm manifest GET).
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)
# The duration histogram's child per (route, method): bounded by the routes, and found
# without prometheus_client's label lookup and lock on every request.
_TIMERS: dict[tuple[str, str], Any] = {}


def request_timer(route: str, method: str) -> Any:
    timer = _TIMERS.get((route, method))
    if timer is None:
        timer = _TIMERS[(route, method)] = REQUEST_SECONDS.labels(route, method)
    return timer


def new_request_id(request: web.BaseRequest) -> str:
    """The client's X-Request-Id, else one of ours."""
    return request.headers.get("X-Request-Id") or f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"


def external_url(request: web.Request) -> str:
    """How clients reach us: `public_url`, else the scheme and host they used."""
    configured = request.app[keys.SETTINGS].public_url
    if configured:
        return configured.rstrip("/")
    scheme = request.headers.get("X-Forwarded-Proto", request.scheme)
    return f"{scheme}://{request.host}"


def challenge(request: web.Request) -> str:
    # Bearer, not Basic: docker refuses to send an anonymous request to a registry that
    # asked for Basic credentials it does not have, which would break public pulls and
    # every `registry-mirrors` pull. The token endpoint hands out anonymous tokens.
    return f'Bearer realm="{external_url(request)}/token",service="{TOKEN_SERVICE}"'


def error_response(error: RegistryError, request: web.Request | None = None) -> web.Response:
    ERRORS.labels(error.code).inc()
    headers = {**API_VERSION, **error.headers}
    if error.code == "UNAUTHORIZED" and request is not None and "WWW-Authenticate" not in headers:
        headers["WWW-Authenticate"] = challenge(request)
    return web.Response(
        status=error.status,
        body=json.dumps(error.envelope()).encode(),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def serve_request(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every registry request, in one middleware (each layer of aiohttp's middleware chain is
    a cost of its own on a warm GET): bind a request id to every log line, check the
    credentials, run the handler, render any failure as the OCI error envelope, time it.

    Failed logins are limited by `request.remote`, the peer address: X-Forwarded-For is
    whatever the client wants it to be.
    """
    request_id = new_request_id(request)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    try:
        access = request.app[keys.ACCESS]
        request[keys.USER] = await access.authenticate(request.headers.get("Authorization"), request.remote)
        response = await handler(request)
    except Exception as exc:
        response = _failure_response(request, exc)
    else:
        if not response.prepared:
            response.headers.update(API_VERSION)
    route = request.match_info.route.name or "other"
    request_timer(route, request.method).observe(time.perf_counter() - started)
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    return response


def _failure_response(request: web.Request, failure: Exception) -> web.StreamResponse:
    """What a failed request answers; never a bare 500 page (other HTTP exceptions go on)."""
    try:
        raise failure
    except RegistryError as error:
        if error.status >= 500:
            log.warning("request_failed", code=error.code, message=error.message, path=request.path)
        return error_response(error, request)
    except StorageUnavailable as exc:
        log.error("storage_unavailable", error=str(exc), path=request.path)
        return error_response(RegistryError("UNAVAILABLE", "object storage is unavailable"))
    except RedisError as exc:
        # What can do without Redis already has (shared/redisguard.py); this needed it.
        log.warning("redis_needed", error=str(exc), path=request.path)
        return error_response(RegistryError("UNAVAILABLE", "Redis is unavailable"))
    except web.HTTPException as exc:
        if exc.status == 404:
            return error_response(RegistryError("NOT_FOUND", f"no such endpoint {request.path[:200]}"))
        if exc.status == 405:
            return error_response(
                RegistryError("UNSUPPORTED", f"{request.method} is not supported on {request.path[:200]}")
            )
        raise
    except ConnectionResetError:
        # The client hung up before or while we answered: there is no one to answer. The
        # server drops a response it cannot write without logging it as an error.
        log.debug("client_gone", path=request.path, method=request.method)
        return web.Response(status=499, reason="Client Closed Request")
    except Exception:
        log.exception("unhandled_error", path=request.path, method=request.method)
        return error_response(RegistryError("INTERNAL"))
