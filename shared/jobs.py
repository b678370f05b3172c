"""The jobs workers run: their actors and queues, the publishing broker, and the one `enqueue()`.

Messages name an actor and carry only primitives (project, repository, digest), so the
edge, the scheduler and the CLI publish them with a broker alone, without worker code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from redis import Redis as BlockingRedis

NAMESPACE = "seawall"

FILL_QUEUE = "fills"
# Prefetch and warm messages have their own queue, so a burst of them is visible apart
# from client-driven fills (workers consume both side by side).
PREFETCH_QUEUE = "prefetch"
MAINTENANCE_QUEUE = "maintenance"
# Replication runs and their tasks, visible apart from fills and prefetches.
REPLICATION_QUEUE = "replication"


@dataclass(frozen=True, slots=True)
class Job:
    """An actor and the queue it consumes: a message for `actor` goes to `queue`."""

    actor: str
    queue: str


FILL = Job("fill_blob", FILL_QUEUE)
PREFETCH = Job("prefetch_blobs", PREFETCH_QUEUE)
WARM = Job("warm_tag", PREFETCH_QUEUE)
PURGE_EXPIRED_UPLOADS = Job("purge_expired_uploads_job", MAINTENANCE_QUEUE)
SCRUB_BLOBS = Job("scrub_blobs_job", MAINTENANCE_QUEUE)
# The storage lifecycle, one at a time cluster-wide. Args: the attempt (0 when scheduled;
# a run that found another lifecycle job running, or failed, comes back with the next),
# and for eviction and retention first the project's name.
COLLECT_GARBAGE = Job("collect_garbage_job", MAINTENANCE_QUEUE)
EVICT_CACHE = Job("evict_cache_job", MAINTENANCE_QUEUE)
APPLY_RETENTION = Job("apply_retention_job", MAINTENANCE_QUEUE)
# Args: rule name, trigger ("manual", "cron", "on_push"), and for an on-push run the one
# repository and tag pushed (else None, None): plans an execution, enqueues its tasks.
REPLICATE = Job("replicate_rule", REPLICATION_QUEUE)
# Args: task id. Copies one tag of an execution.
REPLICATE_TASK = Job("replicate_task", REPLICATION_QUEUE)


# Idle workers block on a queue's wake list (see workers/broker.py); publishing a message
# the workers should start at once also pushes a token there. Bounded and short-lived, so
# tokens nobody took (no worker running) do not pile up.
WAKE_TOKENS = 16
WAKE_TTL_SECONDS = 10


def wake_key(queue: str) -> str:
    return f"{NAMESPACE}:wake:{queue}"


def make_broker(redis_url: str, timeout: float | None = None) -> RedisBroker:
    """A broker for publishing only (the workers build theirs with middleware).

    `timeout` bounds connecting and each reply (the edge passes `redis_timeout`, so a
    stalled Redis fails a cache miss with a RedisError instead of holding it).
    """
    if timeout is None:
        return RedisBroker(url=redis_url, namespace=NAMESPACE)  # type: ignore[no-untyped-call]
    client = BlockingRedis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    return RedisBroker(client=client, namespace=NAMESPACE)  # type: ignore[no-untyped-call]


def enqueue(
    broker: RedisBroker, job: Job, args: tuple[Any, ...], *, delay_ms: int | None = None
) -> dramatiq.Message[Any]:
    """Publish a message for `job`; without a delay, also wake an idle worker of its queue.

    Blocking (the broker's client is synchronous): callers on an event loop run it on a thread.
    """
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=job.queue, actor_name=job.actor, args=args, kwargs={}, options={}
    )
    enqueued = broker.enqueue(message, delay=delay_ms)
    if delay_ms is None:
        key = wake_key(job.queue)
        with broker.client.pipeline(transaction=False) as pipe:
            pipe.lpush(key, "1")
            pipe.ltrim(key, 0, WAKE_TOKENS - 1)
            pipe.expire(key, WAKE_TTL_SECONDS)
            pipe.execute()
    return enqueued
