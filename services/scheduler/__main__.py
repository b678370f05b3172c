"""Run the scheduler: `python -m services.scheduler --config seawall.yaml`."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from datetime import UTC, datetime

import click
import dramatiq
from redis.asyncio import Redis

from services.scheduler.leader import LeaderLease
from services.scheduler.schedule import MAINTENANCE, Trigger
from shared.logging import configure_logging, get_logger
from shared.proxy.events import MAINTENANCE_QUEUE
from shared.settings import Settings, load_settings

log = get_logger("scheduler")
TICK_SECONDS = 5.0


def enqueue(trigger: Trigger) -> None:
    broker = dramatiq.get_broker()
    broker.enqueue(
        dramatiq.Message(
            queue_name=MAINTENANCE_QUEUE, actor_name=trigger.actor, args=(), kwargs={}, options={}
        )
    )
    log.info("trigger_fired", trigger=trigger.name, actor=trigger.actor)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    assert settings.redis_url is not None
    redis = Redis.from_url(settings.redis_url)
    lease = LeaderLease(redis)
    last = datetime.now(UTC)
    try:
        while not stop.is_set():
            now = datetime.now(UTC)
            if await lease.hold():
                for trigger in MAINTENANCE:
                    if trigger.due_between(last, now):
                        enqueue(trigger)
            last = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_SECONDS)
    finally:
        await lease.release()
        await redis.aclose()


@click.command()
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None, help="seawall.yaml")
def main(config: str | None) -> None:
    settings = load_settings(config)
    configure_logging(settings.log_format, settings.log_level)
    if settings.redis_url is None:
        raise click.ClickException("the scheduler needs redis_url (or start it with `seawall up`)")
    from workers.broker import setup_broker

    setup_broker(settings)

    async def main_loop() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info("scheduler_started", triggers=[t.name for t in MAINTENANCE])
        await run(settings, stop)

    asyncio.run(main_loop())


if __name__ == "__main__":
    main()
