"""Replication actors: plan an execution of a rule, run one of its tasks (see workers/replication.py)."""

from __future__ import annotations

import time

import dramatiq
from dramatiq.middleware import CurrentMessage

from shared import jobs
from workers import context
from workers.replication import UnknownRule, UnknownTask, run_task, start_execution

# Failures of the job itself (not of the copy, which the task records and retries): Redis
# or the bucket away while the records are written. Tried again this many times.
JOB_RETRIES = 20


# Retried when Redis or the bucket failed it. The message's id names the execution it
# starts: retried, or redelivered after its worker died, it resumes that execution.
@dramatiq.actor(
    actor_name=jobs.REPLICATE.actor,
    queue_name=jobs.REPLICATE.queue,
    max_retries=3,
    min_backoff=5_000,
    max_backoff=60_000,
    time_limit=3_600_000,
    throws=(UnknownRule,),
)
async def replicate_rule(
    rule: str, trigger: str, only_repository: str | None = None, only_tag: str | None = None
) -> None:
    message = CurrentMessage.get_current_message()
    claim = message.message_id if message is not None else None
    await start_execution(context.current(), rule, trigger, only_repository, only_tag, claim=claim)


def _retry_when(retries: int, exception: BaseException) -> bool:
    """A task that waits (for quota, or its backoff) always comes back; a failed job a few times."""
    return isinstance(exception, dramatiq.Retry) or retries < JOB_RETRIES


# The copy's own failures are counted and retried by run_task; the message comes back
# when the task says (quota reopening, backoff over) through dramatiq.Retry.
@dramatiq.actor(
    actor_name=jobs.REPLICATE_TASK.actor,
    queue_name=jobs.REPLICATE_TASK.queue,
    retry_when=_retry_when,
    min_backoff=5_000,
    max_backoff=300_000,
    time_limit=24 * 3_600_000,
    throws=(UnknownTask,),
)
async def replicate_task(task_id: str) -> None:
    task = await run_task(context.current(), task_id)
    if task.active and task.waiting_until is not None:
        delay_ms = max(0, int((task.waiting_until - time.time()) * 1000)) + 500
        raise dramatiq.Retry(
            f"task {task.id} {task.status.value} until {task.waiting_until:.0f}", delay=delay_ms
        )
