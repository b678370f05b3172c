"""Builds the Redis broker from settings, with middleware, before any actor is imported."""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AsyncIO
from dramatiq.middleware.prometheus import Prometheus

from shared.proxy.events import PREFETCH_QUEUE
from shared.settings import Settings


def setup_broker(settings: Settings) -> RedisBroker:
    if settings.redis_url is None:
        raise RuntimeError("workers need redis_url (set it, or start them with `seawall up`)")
    broker = RedisBroker(url=settings.redis_url, namespace="seawall")  # type: ignore[no-untyped-call]
    # Actors are coroutines; this middleware runs them on one event loop per process.
    broker.add_middleware(AsyncIO())
    # Prefetch and warm messages have their own queue, so a burst of them is visible
    # apart from client-driven fills (Dramatiq consumes both queues side by side).
    # No actor declares it for fill messages, so declare it here.
    broker.declare_queue(PREFETCH_QUEUE)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Set by `seawall worker`: every worker process writes its metrics to that
        # directory and one exposition server serves their sum.
        broker.add_middleware(Prometheus())
    dramatiq.set_broker(broker)
    return broker
