"""Idle workers wait on the queue's wake list, and enqueued jobs push to it."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import dramatiq
import pytest
import redis
from dramatiq import Worker
from dramatiq.common import dq_name

from shared.jobs import Job, enqueue, make_broker, wake_key
from tests.fixtures.proxy import wait_for
from workers.broker import WakeableRedisBroker

QUEUE = "wake-test"
RECORD = Job("record", QUEUE)
# Longer than the first message may take below: only a wake token gets it taken in time.
# (Also how long the worker's threads take to notice the stop at teardown.)
IDLE_MS = 3_000


@pytest.fixture
def worker(redis_url: str) -> Iterator[tuple[WakeableRedisBroker, list[str]]]:
    broker = WakeableRedisBroker(url=redis_url, namespace="seawall")  # type: ignore[no-untyped-call]
    seen: list[str] = []
    done = threading.Event()

    def record(value: str) -> None:
        seen.append(value)
        done.set()

    dramatiq.actor(record, broker=broker, actor_name="record", queue_name=QUEUE)
    running = Worker(broker, worker_threads=1, worker_timeout=IDLE_MS)
    running.start()
    try:
        yield broker, seen
    finally:
        # The consumers (the queue's and its delay queue's) notice the stop only when a
        # token or their idle timeout ends their wait.
        stopping = threading.Thread(target=running.stop, kwargs={"timeout": IDLE_MS})
        stopping.start()
        client = redis.Redis.from_url(redis_url)
        while stopping.is_alive():
            for queue in (QUEUE, dq_name(QUEUE)):
                client.lpush(wake_key(queue), "1")
            stopping.join(0.1)
        broker.close()


def _blocked_on_wake(redis_url: str) -> bool:
    clients = redis.Redis.from_url(redis_url).client_list()
    return any(c.get("cmd") == "blpop" and "b" in c.get("flags", "") for c in clients)


def test_an_idle_worker_blocks_on_the_wake_list_and_a_published_event_wakes_it(
    worker: tuple[WakeableRedisBroker, list[str]], redis_url: str
) -> None:
    _, seen = worker
    wait_for(lambda: _blocked_on_wake(redis_url), 10, "consumer blocked on its wake list")

    publisher = make_broker(redis_url)
    try:
        enqueue(publisher, RECORD, ("first",))
        # Taken long before the idle timeout: the token woke the consumer.
        wait_for(lambda: seen == ["first"], IDLE_MS / 1000 / 2, "message taken after the wake")
        assert redis.Redis.from_url(redis_url).llen(wake_key(QUEUE)) == 0

        # A burst leaves a bounded number of tokens, and every message is taken.
        for n in range(40):
            enqueue(publisher, RECORD, (f"burst-{n}",))
        assert redis.Redis.from_url(redis_url).llen(wake_key(QUEUE)) <= 16
        wait_for(lambda: len(seen) == 41, 20, "a burst taken")
    finally:
        publisher.close()
