"""Builds the Redis broker from settings, with middleware, before any actor is imported."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterable
from types import FrameType
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.cli import RET_KILLED
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import AsyncIO, CurrentMessage
from dramatiq.middleware.prometheus import Prometheus
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared import lifetime
from shared.eventloop import use_uvloop
from shared.jobs import NAMESPACE, PREFETCH_QUEUE, REPLICATION_QUEUE, wake_key
from shared.settings import Settings

# A consumer with as many messages in hand as it may prefetch checks again after this long.
BUSY_PAUSE_SECONDS = 0.01
# Bounds on the workers' broker connections. Long enough that a Redis stalled for seconds
# (a slow fork, a failover) just delays the workers, which then carry on where they were:
# a reply given up for lost might have been a fetch that moved messages to this worker.
# Short enough that a Redis gone without closing its connections is noticed, and the
# consumers reconnect, in half a minute rather than after TCP's retransmissions.
READ_TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 5.0
# Idle pooled connections are checked with a PING before use after this long.
HEALTH_CHECK_SECONDS = 30
# How much sooner than the read timeout a blocking wait for a wake token must end.
_WAIT_MARGIN_SECONDS = 1.0
# Share (per million) of broker commands that also run the queue's maintenance, which gives
# the unacked messages of a worker silent for a minute (dead) back to the queue. An idle
# worker process fetches each queue about once a second: with Dramatiq's 1000, one other
# process took a dead one's message back some 17 minutes after the minute, on average,
# longer than a replication execution's running marker lives (10 minutes); with 10000,
# under two minutes after it.
MAINTENANCE_CHANCE = 10_000

# What a lost or stalled Redis raises. Dramatiq turns only connection errors into its
# ConnectionClosed (consumers reconnect, acks are retried); a timeout would end up in its
# "unexpected error" paths, where an ack is dropped and a requeue can kill the consumer.
_LOST = (redis.ConnectionError, redis.TimeoutError)


class WakeableConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer, but idle it waits on the queue's wake list.

    The stock consumer sleeps between polls, backing off to the idle timeout (a second):
    a cache miss on a quiet system would wait that long for a worker. Blocking on a list
    the publisher pushes to instead wakes a worker within a millisecond, and costs one
    blocking call per idle timeout rather than a poll every few milliseconds.

    Every Redis failure, timeouts included, leaves as ConnectionClosed, which Dramatiq
    recovers from: the consumer restarts, and acks wait for Redis to come back.
    """

    def __init__(self, broker: RedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)  # type: ignore[no-untyped-call]
        self._idle_seconds = timeout / 1000
        read_timeout = broker.client.connection_pool.connection_kwargs.get("socket_timeout")
        if read_timeout:
            # A blocking wait longer than the read timeout would always end in a timeout.
            self._idle_seconds = max(min(self._idle_seconds, read_timeout - _WAIT_MARGIN_SECONDS), 0.1)
        self._wake_key = wake_key(queue_name)
        self.timeout = 1  # the stock idle sleep (milliseconds, rounded down): waiting happens here

    def __next__(self) -> Any:
        try:
            if not self.message_cache and self.misses:
                # The last fetch found nothing: wait for a wake token (or the idle timeout).
                if self.outstanding_message_count >= self.prefetch:
                    time.sleep(BUSY_PAUSE_SECONDS)
                else:
                    self.broker.client.blpop([self._wake_key], timeout=self._idle_seconds)
            return super().__next__()  # type: ignore[no-untyped-call]
        except _LOST as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    def ack(self, message: Any) -> None:
        try:
            super().ack(message)  # type: ignore[no-untyped-call]
        except _LOST as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    def nack(self, message: Any) -> None:
        try:
            super().nack(message)  # type: ignore[no-untyped-call]
        except _LOST as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    def requeue(self, messages: Iterable[Any]) -> None:
        try:
            super().requeue(messages)  # type: ignore[no-untyped-call]
        except _LOST as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]


class WakeableRedisBroker(RedisBroker):
    @property
    def consumer_class(self) -> type[WakeableConsumer]:
        return WakeableConsumer


def connection_pool(url: str, read_timeout: float = READ_TIMEOUT_SECONDS) -> redis.ConnectionPool:
    """The broker's connections: bounded connect and reads, failures reported, not retried.

    Retrying a timed-out script call could run it twice; Dramatiq retries what is safe to.
    """
    return redis.ConnectionPool.from_url(
        url,
        socket_timeout=read_timeout,
        socket_connect_timeout=min(CONNECT_TIMEOUT_SECONDS, read_timeout),
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=HEALTH_CHECK_SECONDS,
    )


def _settle_worker_process(main_pid: int) -> None:
    """In a worker process forked by Dramatiq's main process: stop for good when it does.

    The main process passes every stop signal it gets on to its worker processes, and it
    may get several: the kernel sends the parent-death signal (see shared/lifetime.py)
    once for each thread of the parent that exits. Dramatiq takes a second SIGTERM as
    "kill now" and raises SystemExit, which then waits forever for the AsyncIO
    middleware's event loop thread; this process exits at once instead.
    """
    graceful = signal.getsignal(signal.SIGTERM)
    if callable(graceful):
        stopping = False

        def stop(signum: int, frame: FrameType | None) -> None:
            nonlocal stopping
            if stopping:
                os._exit(RET_KILLED)
            stopping = True
            graceful(signum, frame)

        signal.signal(signal.SIGTERM, stop)
    # If the main process dies without passing a stop on (SIGKILL, the OOM killer), there
    # is nobody left to report to: go at once rather than run on, orphaned. (The main
    # process itself gets SIGTERM when `seawall up`, which starts it, dies.)
    lifetime.follow_parent(main_pid, signal.SIGKILL)


def setup_broker(settings: Settings, *, read_timeout: float = READ_TIMEOUT_SECONDS) -> RedisBroker:
    if settings.redis_url is None:
        raise RuntimeError("workers need redis_url (set it, or start them with `seawall up`)")
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        _settle_worker_process(parent.pid)
    pool = connection_pool(settings.redis_url, read_timeout)
    broker = WakeableRedisBroker(  # type: ignore[no-untyped-call]
        namespace=NAMESPACE, connection_pool=pool, maintenance_chance=MAINTENANCE_CHANCE
    )
    # Actors are coroutines; this middleware runs them on one event loop per process.
    use_uvloop()
    broker.add_middleware(AsyncIO())
    # Replication starts read their message's id (workers/actors/replication.py).
    broker.add_middleware(CurrentMessage())
    # Prefetch and warm messages have their own queue, so a burst of them is visible
    # apart from client-driven fills (Dramatiq consumes both queues side by side).
    # No actor declares it for fill messages, so declare it here.
    broker.declare_queue(PREFETCH_QUEUE)
    # Replication runs and tasks have their own queue too (shared/jobs.py).
    broker.declare_queue(REPLICATION_QUEUE)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Set by `seawall worker`: every worker process writes its metrics to that
        # directory and one exposition server serves their sum.
        broker.add_middleware(Prometheus())
    dramatiq.set_broker(broker)
    return broker
