"""Operational endpoints: Prometheus metrics (own address or registry port), liveness, readiness."""

from __future__ import annotations

import asyncio
import math
import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from services.edge import keys
from shared.metrics import QUOTA_LIMIT, QUOTA_REMAINING
from shared.ratelimit import Governor


async def exposition(app: web.Application) -> web.Response:
    """The Prometheus exposition of this process, with quota gauges read from `app`'s Redis."""
    # Quota gauges are read from the shared bucket at scrape time: a process only learns
    # of spending when it spends, so its own values would go stale as the bucket refills.
    for upstream in app[keys.SETTINGS].upstreams:
        status = await Governor(app[keys.REDIS], upstream).status()
        if status.limit is not None and status.remaining is not None:
            QUOTA_LIMIT.labels(upstream.name).set(status.limit)
            QUOTA_REMAINING.labels(upstream.name).set(
                0 if status.closed_until else math.floor(status.remaining)
            )
    response = web.Response(body=await asyncio.to_thread(_latest))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def _latest() -> bytes:
    """This process's metrics; with several edge processes (`seawall up` sets the
    directory), the sum over all of them, as each scrape reaches only one."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return generate_latest()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


async def metrics(request: web.Request) -> web.Response:
    """`/metrics` on the registry port (only with `metrics_on_registry_port: true`)."""
    return await exposition(request.app)


def metrics_app(registry: web.Application) -> web.Application:
    """The app of `metrics_listen`: `/metrics` and nothing else, for the registry app's process."""

    async def scrape(request: web.Request) -> web.Response:
        return await exposition(registry)

    app = web.Application()
    app.router.add_get("/metrics", scrape, name="metrics")
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the bucket and Redis both answer."""
    app = request.app
    checks = {}
    try:
        await app[keys.STORE].stat("catalog/")
        checks["storage"] = "ok"
    except Exception as exc:  # any failure means not ready; say which
        checks["storage"] = str(exc)[:200]
    try:
        await app[keys.REDIS].ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = str(exc)[:200]
    ready = all(v == "ok" for v in checks.values())
    return web.json_response(checks, status=200 if ready else 503)
