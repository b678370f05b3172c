"""Publishing an execution's tasks a few at a time, without losing any to a worker that dies
between choosing them and publishing them.

Whoever moves an execution on (its start, or a task that ended) is a dispatcher, named
(`START`, or the task's id). In one atomic step it claims the next tasks in planned order
and records the claim under its name as not yet published; then it publishes them and
marks the claim published. The same dispatcher again (its message delivered anew after
its worker died, or a duplicate) gets its own claim back instead of claiming more, and
publishes it again unless it was marked published. A claim still unpublished after
`STALE_CLAIM_SECONDS` (its dispatcher died and its message has not come back yet) is
published by the next task of the execution that ends. A task published twice is safe:
a second run of it copies only what is missing, or finds it over.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from redis.asyncio import Redis

from shared import jobs
from shared.replication.records import task_id
from shared.replication.store import RECORD_TTL_SECONDS, ExecutionStore
from workers.context import WorkerContext

log = structlog.get_logger("worker")

# The dispatcher name of an execution's start.
START = "start"
# A claim left unpublished this long is published by another dispatcher. Publishing takes
# milliseconds; this only has to outlast a slow one.
STALE_CLAIM_SECONDS = 30.0

# Claim the next ARGV[2] tasks (at most up to ARGV[3], the execution's total) for the
# dispatcher ARGV[1], or give it back the claim it made before; {first:last, unpublished}.
_CLAIM = """
local claimed = redis.call('hget', KEYS[2], ARGV[1])
if claimed then
  return {claimed, redis.call('zscore', KEYS[3], ARGV[1]) and 1 or 0}
end
local first = tonumber(redis.call('get', KEYS[1]) or '0')
local last = math.max(first, math.min(first + tonumber(ARGV[2]), tonumber(ARGV[3])))
local range = first .. ':' .. last
redis.call('set', KEYS[1], last, 'ex', ARGV[5])
redis.call('hset', KEYS[2], ARGV[1], range)
redis.call('expire', KEYS[2], ARGV[5])
if last == first then return {range, 0} end
redis.call('zadd', KEYS[3], ARGV[4], ARGV[1])
redis.call('expire', KEYS[3], ARGV[5])
return {range, 1}
"""

# The claims unpublished since ARGV[1] or before, taken over (their time set to ARGV[2],
# so no other dispatcher takes them too): {dispatcher, first:last, ...}.
_TAKE_STALE = """
local out = {}
for _, name in ipairs(redis.call('zrangebyscore', KEYS[1], '-inf', ARGV[1])) do
  redis.call('zadd', KEYS[1], ARGV[2], name)
  table.insert(out, name)
  table.insert(out, redis.call('hget', KEYS[2], name) or '0:0')
end
return out
"""


def dispatched_key(execution_id: str) -> str:
    """How many of the execution's tasks, in order, have been claimed for publishing."""
    return f"seawall:replication:execution:{execution_id}:dispatched"


def claims_key(execution_id: str) -> str:
    """A hash: dispatcher -> the range of task indexes it claimed (`first:last`, last excluded)."""
    return f"seawall:replication:execution:{execution_id}:claims"


def unpublished_key(execution_id: str) -> str:
    """A sorted set: the dispatchers whose claim is not known to be published, by claim time."""
    return f"seawall:replication:execution:{execution_id}:unpublished"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _task_ids(execution_id: str, claimed: bytes | str) -> list[str]:
    first, _, last = _text(claimed).partition(":")
    return [task_id(execution_id, index) for index in range(int(first), int(last))]


async def publish_tasks(ctx: WorkerContext, task_ids: list[str]) -> None:
    """One REPLICATE_TASK message per task id."""
    if not task_ids:
        return
    redis_url = ctx.settings.redis_url
    assert redis_url is not None  # a WorkerContext is only built with one

    def publish() -> None:
        broker = jobs.make_broker(redis_url)
        try:
            for one in task_ids:
                jobs.enqueue(broker, jobs.REPLICATE_TASK, (one,))
        finally:
            broker.close()

    # The broker's client is synchronous; keep the event loop free meanwhile.
    await asyncio.to_thread(publish)


async def claim(
    redis: Redis, execution_id: str, dispatcher: str, count: int, total: int, now: float | None = None
) -> tuple[list[str], bool]:
    """The first step of a dispatch: the task ids `dispatcher` claims (or claimed before),
    and whether they still have to be published."""
    claimed, unpublished = await redis.eval(
        _CLAIM,
        3,
        dispatched_key(execution_id),
        claims_key(execution_id),
        unpublished_key(execution_id),
        dispatcher,
        str(count),
        str(total),
        repr(time.time() if now is None else now),
        str(RECORD_TTL_SECONDS),
    )
    return _task_ids(execution_id, claimed), bool(unpublished)


async def dispatch(
    ctx: WorkerContext, store: ExecutionStore, execution_id: str, dispatcher: str, count: int
) -> list[str]:
    """Publish the execution's next `count` tasks not yet claimed, in planned order (or what
    `dispatcher` claimed before and did not publish); the task ids published."""
    execution = await store.execution(execution_id)
    if execution is None or execution.done:
        return []
    chosen, unpublished = await claim(ctx.redis, execution_id, dispatcher, count, execution.total)
    if not unpublished:
        return []
    await publish_tasks(ctx, chosen)
    await ctx.redis.zrem(unpublished_key(execution_id), dispatcher)
    return chosen


async def publish_stale(ctx: WorkerContext, execution_id: str, now: float | None = None) -> list[str]:
    """Publish the claims of the execution left unpublished for `STALE_CLAIM_SECONDS`; the
    task ids published."""
    now = time.time() if now is None else now
    taken = await ctx.redis.eval(
        _TAKE_STALE,
        2,
        unpublished_key(execution_id),
        claims_key(execution_id),
        repr(now - STALE_CLAIM_SECONDS),
        repr(now),
    )
    published: list[str] = []
    for name, claimed in zip(taken[::2], taken[1::2], strict=True):
        chosen = _task_ids(execution_id, claimed)
        await publish_tasks(ctx, chosen)
        await ctx.redis.zrem(unpublished_key(execution_id), name)
        log.warning(
            "replication_dispatch_recovered", execution=execution_id, dispatcher=_text(name), tasks=chosen
        )
        published += chosen
    return published
