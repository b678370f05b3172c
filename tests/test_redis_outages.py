"""The scheduler and the workers' broker ride out a stalled (SIGSTOP) or restarted Redis.

Each test starts a Redis of its own: pausing the session's would stall other tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

import dramatiq
import pytest
import redis
from dramatiq import Worker

from services.embedded import RedisServer, start_redis
from services.processes import ManagedProcess, wait_until
from services.scheduler.__main__ import run
from services.scheduler.schedule import Trigger
from shared import jobs
from shared.jobs import MAINTENANCE_QUEUE
from shared.settings import Settings
from tests.support.processes import paused
from workers.broker import WakeableRedisBroker, connection_pool

LEASE_KEY = "seawall:scheduler:leader"
QUEUE = "outage-test"


def log_of(process: ManagedProcess) -> str:
    return process.log_path.read_text(errors="replace")


def lease_holder(client: redis.Redis) -> bytes | None:
    """The scheduler holding the lease; None while there is none or Redis is away."""
    try:
        holder: bytes | None = client.get(LEASE_KEY)
    except redis.RedisError:
        return None
    return holder


@pytest.mark.slow
def test_scheduler_keeps_its_lease_through_a_redis_stall_and_retakes_it_after_a_restart(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("SEAWALL_")}
    env |= {
        "SEAWALL_REDIS_URL": own_redis.url,
        "SEAWALL_REDIS_TIMEOUT": "1s",
        "SEAWALL_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    argv = [sys.executable, "-m", "services.scheduler"]
    with (
        ManagedProcess("scheduler", argv, tmp_path / "scheduler.log", env) as scheduler,
        redis.Redis.from_url(own_redis.url) as client,
    ):
        wait_until(lambda: lease_holder(client) is not None, 30, "the scheduler to take its lease")
        holder = lease_holder(client)

        # Long enough that a lease check starts during the stall (a tick is 5 s) and meets
        # it for longer than redis-py's default read timeout (5 s) as well as ours.
        with paused(own_redis.pid):
            time.sleep(11)
        wait_until(
            lambda: "leader_lease_kept" in log_of(scheduler) or not scheduler.running(),
            15,
            "the lease confirmed",
        )
        assert scheduler.running(), log_of(scheduler)
        assert "leader_lease_unconfirmed" in log_of(scheduler)
        assert lease_holder(client) == holder

        # A new, empty Redis on the same port: the lease is gone, and taken again.
        port = own_redis.port
        own_redis.stop()
        time.sleep(6)
        assert scheduler.running(), log_of(scheduler)
        with start_redis(tmp_path / "redis-2", port=port):
            wait_until(lambda: lease_holder(client) == holder, 15, "the lease taken again")
            assert scheduler.running(), log_of(scheduler)
            assert log_of(scheduler).count("leader_lease_taken") == 2


@pytest.mark.slow
def test_scheduler_fires_nothing_while_it_cannot_confirm_its_lease(own_redis: RedisServer) -> None:
    settings = Settings(redis_url=own_redis.url, redis_timeout="1s")
    broker = WakeableRedisBroker(namespace="seawall", connection_pool=connection_pool(own_redis.url, 1.0))  # type: ignore[no-untyped-call]
    every_second = Trigger("every-second", "* * * * * *", jobs.Job("noop", jobs.MAINTENANCE_QUEUE))
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    scheduler = threading.Thread(
        target=loop.run_until_complete, args=(run(settings, stop, broker, [every_second], tick=0.5),)
    )
    scheduler.start()
    client = redis.Redis.from_url(own_redis.url)
    fired = f"seawall:{MAINTENANCE_QUEUE}.msgs"

    def fired_since(moment: float) -> list[float]:
        """When the messages enqueued after `moment` (a time.time()) were made."""
        made = [json.loads(data)["message_timestamp"] / 1000 for data in client.hvals(fired)]
        return [at for at in made if at > moment]

    try:
        wait_until(lambda: len(fired_since(0)) >= 1, 10, "a first firing")
        stalled = time.time()
        with paused(own_redis.pid):
            time.sleep(3)
        resumed = time.time()
        wait_until(lambda: len(fired_since(resumed)) >= 1, 10, "a firing after the stall")
    finally:
        loop.call_soon_threadsafe(stop.set)
        scheduler.join(15)
        loop.close()
        broker.close()
    # A tick that confirmed the lease just before the stall may fire at its very start.
    assert [at for at in fired_since(stalled + 0.2) if at < resumed] == []
    client.close()


@pytest.mark.slow
def test_delayed_messages_are_still_consumed_after_redis_stalled_past_the_read_timeout(
    own_redis: RedisServer,
) -> None:
    # The broker's read timeout (1 s) is shorter than the stall, so its calls time out.
    pool = redis.ConnectionPool.from_url(own_redis.url, socket_timeout=1, socket_connect_timeout=1)
    broker = WakeableRedisBroker(namespace="seawall", connection_pool=pool)  # type: ignore[no-untyped-call]
    seen: list[str] = []
    actor = dramatiq.actor(seen.append, broker=broker, actor_name="record", queue_name=QUEUE)
    worker = Worker(broker, worker_threads=1, worker_timeout=500)
    worker.start()
    client = redis.Redis.from_url(own_redis.url)
    held = f"seawall:__acks__.{broker.broker_id}.{QUEUE}.DQ"
    try:
        # A retry-like message due in a minute, held by the delay queue's consumer.
        actor.send_with_options(args=("later",), delay=60_000)
        wait_until(lambda: client.scard(held) == 1, 10, "the delayed message fetched")
        with paused(own_redis.pid):
            time.sleep(3)
        # Both consumers carry on: a delayed message and a plain one are taken.
        actor.send_with_options(args=("delayed",), delay=200)
        actor.send("now")
        wait_until(lambda: sorted(seen) == ["delayed", "now"], 30, "both messages taken")
    finally:
        worker.stop()
        broker.close()
        client.close()
