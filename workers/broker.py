"""Builds the Redis broker from settings, with middleware, before any actor is imported."""

from __future__ import annotations

import os
import time
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import AsyncIO
from dramatiq.middleware.prometheus import Prometheus

from shared.eventloop import use_uvloop
from shared.proxy.events import PREFETCH_QUEUE, wake_key
from shared.settings import Settings

# A consumer with as many messages in hand as it may prefetch checks again after this long.
BUSY_PAUSE_SECONDS = 0.01


class WakeableConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer, but idle it waits on the queue's wake list.

    The stock consumer sleeps between polls, backing off to the idle timeout (a second):
    a cache miss on a quiet system would wait that long for a worker. Blocking on a list
    the publisher pushes to instead wakes a worker within a millisecond, and costs one
    blocking call per idle timeout rather than a poll every few milliseconds.
    """

    def __init__(self, broker: RedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)  # type: ignore[no-untyped-call]
        self._idle_seconds = timeout / 1000
        self._wake_key = wake_key(queue_name)
        self.timeout = 1  # the stock idle sleep (milliseconds, rounded down): waiting happens here

    def __next__(self) -> Any:
        if not self.message_cache and self.misses:
            # The last fetch found nothing: wait for a wake token (or the idle timeout).
            if self.outstanding_message_count >= self.prefetch:
                time.sleep(BUSY_PAUSE_SECONDS)
            else:
                try:
                    self.broker.client.blpop([self._wake_key], timeout=self._idle_seconds)
                except redis.ConnectionError as exc:
                    raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        return super().__next__()  # type: ignore[no-untyped-call]


class WakeableRedisBroker(RedisBroker):
    @property
    def consumer_class(self) -> type[WakeableConsumer]:
        return WakeableConsumer


def setup_broker(settings: Settings) -> RedisBroker:
    if settings.redis_url is None:
        raise RuntimeError("workers need redis_url (set it, or start them with `seawall up`)")
    broker = WakeableRedisBroker(url=settings.redis_url, namespace="seawall")  # type: ignore[no-untyped-call]
    # Actors are coroutines; this middleware runs them on one event loop per process.
    use_uvloop()
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
