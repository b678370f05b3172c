"""Run the scheduler: `python -m services.scheduler --config seawall.yaml`.

It fires the maintenance jobs and the replication rules with a cron trigger.

Redis may stall or restart under it. Every call is bounded by `redis_timeout`; a tick
whose lease check fails is logged, fires nothing and the next tick tries again, so the
scheduler never exits because of Redis. A firing that fell due while the lease could not
be confirmed is made on the first tick that confirms it (the jobs are idempotent, so the
rare second firing by a scheduler that took over meanwhile costs nothing but the work).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Sequence
from datetime import UTC, datetime

import click
from dramatiq.brokers.redis import RedisBroker
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.scheduler.leader import LeaderLease, Lease
from services.scheduler.schedule import MAINTENANCE, Trigger, maintenance, replication
from shared import jobs
from shared.logging import configure_logging, get_logger
from shared.settings import Settings, load_settings

log = get_logger("scheduler")
TICK_SECONDS = 5.0
# Idle pooled connections are checked with a PING before use after this long.
HEALTH_CHECK_SECONDS = 30


def connect(settings: Settings) -> Redis:
    """A client whose every call ends within `redis_timeout`, and fails rather than retries."""
    assert settings.redis_url is not None
    timeout = settings.redis_timeout.total_seconds()
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=HEALTH_CHECK_SECONDS,
    )


def enqueue(broker: RedisBroker, trigger: Trigger) -> None:
    jobs.enqueue(broker, trigger.job, trigger.args)
    log.info("trigger_fired", trigger=trigger.name, actor=trigger.actor)


async def fire(broker: RedisBroker, trigger: Trigger) -> bool:
    """Enqueue the trigger's job (on a thread: the broker's client blocks); False if Redis failed."""
    try:
        await asyncio.to_thread(enqueue, broker, trigger)
    except (RedisError, OSError) as exc:
        log.warning("trigger_not_enqueued", trigger=trigger.name, error=str(exc) or type(exc).__name__)
        return False
    return True


class Leadership:
    """Whether this scheduler leads, as the last lease check found; a log line at each change."""

    def __init__(self, lease: LeaderLease) -> None:
        self.lease = lease
        self.standing: Lease | None = None  # None: the last check got no answer from Redis

    async def check(self) -> Lease | None:
        previous = self.standing
        try:
            found = await self.lease.hold()
        except (RedisError, OSError) as exc:
            self.standing = None
            # Neither fire nor assume another scheduler does: the next tick asks again.
            log.warning(
                "leader_lease_unconfirmed",
                error=str(exc) or type(exc).__name__,
                led=previous is not None and previous.ours,
            )
            return None
        self.standing = found
        if found is Lease.TAKEN:
            log.info("leader_lease_taken")
        elif found is Lease.RENEWED and previous is None:
            log.info("leader_lease_kept")  # through a Redis outage
        elif found is Lease.ELSEWHERE and previous is not Lease.ELSEWHERE:
            log.info("leader_lease_held_elsewhere", led=previous is not None and previous.ours)
        return found

    async def step_down(self) -> None:
        try:
            await self.lease.release()
        except (RedisError, OSError) as exc:
            # The lease expires on its own within its TTL.
            log.warning("leader_lease_not_released", error=str(exc) or type(exc).__name__)


async def run(
    settings: Settings,
    stop: asyncio.Event,
    broker: RedisBroker,
    triggers: Sequence[Trigger] = MAINTENANCE,
    tick: float = TICK_SECONDS,
) -> None:
    """Check the lease and fire what is due, every `tick` seconds until `stop` is set."""
    redis = connect(settings)
    leadership = Leadership(LeaderLease(redis))
    # Each trigger fires for times after this; it moves on once a tick has dealt with them.
    since = dict.fromkeys((t.name for t in triggers), datetime.now(UTC))
    try:
        while not stop.is_set():
            now = datetime.now(UTC)
            standing = await leadership.check()
            if standing is not None:
                for trigger in triggers:
                    due = trigger.due_between(since[trigger.name], now)
                    if due and standing.ours and not await fire(broker, trigger):
                        continue  # still due: the next tick tries again
                    since[trigger.name] = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), tick)
    finally:
        if leadership.standing is not Lease.ELSEWHERE:
            await leadership.step_down()
        await redis.aclose()


@click.command()
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None, help="seawall.yaml")
def main(config: str | None) -> None:
    settings = load_settings(config)
    configure_logging(settings.log_format, settings.log_level)
    if settings.redis_url is None:
        raise click.ClickException("the scheduler needs redis_url (or start it with `seawall up`)")
    from workers.broker import setup_broker

    # The scheduler only enqueues: its broker's calls are bounded like its own.
    broker = setup_broker(settings, read_timeout=settings.redis_timeout.total_seconds())

    async def main_loop() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        triggers = maintenance(settings) + replication(settings)
        log.info("scheduler_started", triggers=[t.name for t in triggers])
        await run(settings, stop, broker, triggers)

    asyncio.run(main_loop())


if __name__ == "__main__":
    main()
