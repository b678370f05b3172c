"""On-push replication: a tag stored in a hosted project runs the `on_push` rules it matches.

The run itself is a worker's (shared/replication/triggers.py publishes it). The push has
succeeded by then, so a Redis that cannot take the message costs the run, logged, never
the push.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from dramatiq.errors import DramatiqError
from redis.exceptions import RedisError

from services.edge import keys
from shared.jobs import make_broker
from shared.replication.triggers import PushEvents
from shared.routing import Target

log = structlog.get_logger("edge")


async def push_events(app: web.Application) -> AsyncIterator[None]:
    """The publisher of on-push runs, with a broker bounded like the edge's other calls."""
    settings = app[keys.SETTINGS]
    broker = make_broker(settings.redis_url or "", settings.redis_timeout.total_seconds())
    events = PushEvents(settings, broker)
    app[keys.PUSH_EVENTS] = events
    try:
        yield
    finally:
        events.close()


async def tag_pushed(app: web.Application, repo: Target, tag: str) -> None:
    """`repo:tag` was stored by a push: run the on-push rules of its project that match."""
    if repo.project.type != "hosted":
        return
    try:
        fired = await app[keys.PUSH_EVENTS].pushed(repo.project.name, repo.name, tag)
    except (RedisError, OSError, DramatiqError) as exc:
        log.warning("replication_on_push_not_published", repository=repo.name, tag=tag, error=str(exc))
        return
    if fired:
        log.info("replication_on_push", repository=repo.name, tag=tag, rules=fired)
