"""Where executions and their tasks are kept: Redis while they run, the bucket once they finish.

The protocol between whoever starts an execution (the scheduler, the edge on a push, the
CLI), the workers running its tasks and whoever reads it: the Redis keys and TTLs, and one
method per change. An execution's counts by task status are rolled in the same atomic
step that changes a task, so workers on many hosts update one execution without losing
a count. Once no task has work left, the execution and its tasks are written to the
bucket: flushing Redis loses no finished history (the running ones are live state).

A rule runs once at a time: its running marker holds the id of the execution that runs,
with a TTL that task updates and `refresh` keep alive, so a marker whose workers all died
lapses. A trigger that finds the marker taken is recorded as a skipped execution. A start
names its request (the job message's id): the same request again, redelivered after its
worker died, resumes the execution it started; one that still has no tasks once its marker
lapsed is finished as failed (interrupted) when next read.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from typing import Any, cast

from redis.asyncio import Redis

from shared.registry import layout
from shared.registry.storage import ObjectMissing, ObjectStore
from shared.replication import scripts
from shared.replication.records import (
    LOG_LINES,
    TASK_ACTIVE,
    Execution,
    ExecutionRecord,
    ExecutionStatus,
    Task,
    TaskStatus,
    execution_of,
    new_execution_id,
)

# A running marker lives this long unless a task update or `refresh` renews it; a task
# waiting for quota keeps it until its wait is over, plus this.
RUNNING_TTL_SECONDS = 600
# A running execution's records in Redis, renewed by every write: far beyond any run.
RECORD_TTL_SECONDS = 7 * 86400
# A finished execution stays in Redis this long (the bucket has it for good).
FINISHED_TTL_SECONDS = 3600
# What an execution whose worker died while planning says once its marker has lapsed.
# Executions a listing reads beyond its limit: more than start within one millisecond.
SAME_MILLISECOND_SLACK = 16
INTERRUPTED = "interrupted: its worker stopped while planning it"

_PREFIX = "seawall:replication"


def running_key(rule: str) -> str:
    """The id of the execution of `rule` that runs now."""
    return f"{_PREFIX}:{rule}:running"


def execution_key(execution_id: str) -> str:
    """A hash: each field of the Execution, JSON-encoded (counts are plain integers)."""
    return f"{_PREFIX}:execution:{execution_id}"


def tasks_key(execution_id: str) -> str:
    """A hash: task id -> the Task as JSON."""
    return f"{_PREFIX}:execution:{execution_id}:tasks"


def claim_key(claim: str) -> str:
    """The id of the execution a request (a job message) started."""
    return f"{_PREFIX}:claim:{claim}"


def index_key(rule: str | None) -> str:
    """A sorted set of execution ids by start time: one rule's, or every rule's."""
    return f"{_PREFIX}:{rule}:executions" if rule else f"{_PREFIX}:executions"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fields(execution: Execution) -> list[str]:
    """The execution's hash fields and values, flattened."""
    flat: list[str] = []
    for name, value in execution.model_dump(mode="json").items():
        flat += [name, json.dumps(value)]
    return flat


def _counted(execution: Execution, tasks: Iterable[Task]) -> Execution:
    """The execution with its counts and bytes taken from its tasks."""
    tasks = list(tasks)
    counts: dict[str, Any] = {status.value: 0 for status in TaskStatus}
    for task in tasks:
        counts[task.status.value] += 1
    counts |= {"total": len(tasks), "bytes_moved": sum(task.bytes_moved for task in tasks)}
    return execution.model_copy(update=counts)


def _trimmed(task: Task) -> Task:
    """The task checked afresh (a `model_copy(update=...)` is not), with the last lines of its log."""
    return Task.model_validate(task.model_dump() | {"log": task.log[-LOG_LINES:]})


def _index(task: Task) -> int:
    try:
        return int(task.id.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return 0


class ExecutionStore:
    """Executions and tasks: live in Redis, kept in the bucket once finished."""

    def __init__(self, redis: Redis, objects: ObjectStore) -> None:
        self._redis = redis
        self._objects = objects

    # Starting

    async def start(self, rule: str, trigger: str, claim: str | None = None) -> Execution:
        """A new running execution of `rule`, holding its running marker; when another
        execution of the rule still runs, a `skipped` one, already kept in the bucket.

        `claim` names the request (a job message's id): started again with it (the message
        redelivered after its worker died, or retried), the execution it started is
        returned as it stands, running (to be planned again) or over."""
        now = time.time()
        execution_id = new_execution_id(now)
        if claim is not None and not await self._redis.set(
            claim_key(claim), execution_id, nx=True, ex=RECORD_TTL_SECONDS
        ):
            execution_id = _text(await self._redis.get(claim_key(claim)) or execution_id)
            earlier = await self.execution(execution_id)
            if earlier is not None and earlier.message != INTERRUPTED:
                return earlier
            if earlier is not None:  # interrupted (its marker lapsed): this request starts anew
                execution_id = new_execution_id(now)
                await self._redis.set(claim_key(claim), execution_id, ex=RECORD_TTL_SECONDS)
        execution = Execution.model_validate(
            {"id": execution_id, "rule": rule, "trigger": trigger, "started": now}
        )
        running = await self._take(execution)
        if running is None:
            return execution
        skipped = execution.model_copy(
            update={
                "status": ExecutionStatus.SKIPPED,
                "finished": now,
                "message": f"not started: execution {running} of this rule is still running",
            }
        )
        await self._keep(ExecutionRecord(execution=skipped))
        return skipped

    async def _take(self, execution: Execution) -> str | None:
        """Take the rule's running marker for `execution` and write its live record; the
        id of the execution that holds the marker instead, if one does."""
        stale = ""
        while True:
            holder = await self._redis.eval(  # 0 when taken, else the holder's id
                scripts.START,
                4,
                running_key(execution.rule),
                execution_key(execution.id),
                index_key(None),
                index_key(execution.rule),
                execution.id,
                str(RUNNING_TTL_SECONDS * 1000),
                str(RECORD_TTL_SECONDS),
                str(execution.started),
                stale,
                *_fields(execution),
            )
            if not isinstance(holder, bytes | str):
                return None
            running = _text(holder)
            # A marker whose execution is over (or gone) is left from a crash: replace it.
            if running == stale or not await self._over(running):
                return running
            stale = running

    async def _over(self, execution_id: str) -> bool:
        live = await self._live(execution_id)
        return live is None or live.done

    async def add_tasks(self, execution_id: str, tasks: list[Task]) -> None:
        """Add the execution's planned tasks (a task already added is left as it is)."""
        if not tasks:
            return
        values: list[str] = []
        for task in map(_trimmed, tasks):
            values += [task.id, task.model_dump_json(), task.status.value, str(task.bytes_moved)]
        await self._redis.eval(
            scripts.ADD_TASKS,
            2,
            tasks_key(execution_id),
            execution_key(execution_id),
            str(RECORD_TTL_SECONDS),
            *values,
        )

    async def reopen(self, execution_id: str) -> Execution | None:
        """Make a finished execution run again (to retry tasks of it): it takes its rule's
        running marker again, from Redis or from the bucket. None when the execution is
        unknown or another execution of the rule runs now."""
        record = await self._record(execution_id)
        if record is None:
            return None
        if not record.execution.done:
            return record.execution
        if record.execution.status is ExecutionStatus.SKIPPED:
            return None
        execution = _counted(record.execution, record.tasks).model_copy(
            update={
                "status": ExecutionStatus.RUNNING,
                "finished": None,
                "message": None,
                "stop_requested": False,
            }
        )
        if await self._take(execution) is not None:
            return None
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(tasks_key(execution_id))
            if record.tasks:
                pipe.hset(tasks_key(execution_id), mapping={t.id: t.model_dump_json() for t in record.tasks})
                pipe.expire(tasks_key(execution_id), RECORD_TTL_SECONDS)
            await pipe.execute()
        return execution

    # Changing

    async def update_task(self, task: Task) -> None:
        """Store the task as it is now and roll the change into its execution's counts and
        bytes; also renews the rule's running marker. A task Redis does not hold (its
        execution is over and gone from Redis) is left alone."""
        await self._update(task, only_from=())

    async def _update(self, task: Task, only_from: Iterable[TaskStatus]) -> bool:
        task = _trimmed(task)
        hold_ms = RUNNING_TTL_SECONDS * 1000
        record_ttl = RECORD_TTL_SECONDS
        if task.status is TaskStatus.WAITING and task.waiting_until:
            wait = max(0.0, task.waiting_until - time.time())
            hold_ms += int(wait * 1000)
            record_ttl += int(wait)
        written = await self._redis.eval(
            scripts.UPDATE_TASK,
            3,
            tasks_key(task.execution),
            execution_key(task.execution),
            running_key(task.rule),
            task.id,
            task.model_dump_json(),
            task.status.value,
            str(task.bytes_moved),
            ",".join(status.value for status in only_from),
            str(hold_ms),
            str(record_ttl),
            task.execution,
        )
        return bool(written)

    async def set_message(self, execution_id: str, message: str | None) -> None:
        """What the execution shows while it runs (e.g. "waiting for quota, reopens at …")."""
        if await self._redis.exists(execution_key(execution_id)):
            await self._redis.hset(execution_key(execution_id), "message", json.dumps(message))

    async def refresh(self, execution_id: str) -> bool:
        """Keep the execution's running marker alive; False when it no longer holds it."""
        rule = await self._redis.hget(execution_key(execution_id), "rule")
        if rule is None:
            return False
        held = await self._redis.eval(
            scripts.REFRESH, 1, running_key(json.loads(rule)), execution_id, str(RUNNING_TTL_SECONDS * 1000)
        )
        return bool(held)

    async def request_stop(self, execution_id: str) -> bool:
        """Ask a running execution to stop: tasks not yet running (pending, or waiting for
        quota) are stopped now, running ones by their workers when they next check. Finishes
        the execution when nothing runs any more. False when it is not running."""
        live = await self._live(execution_id)
        if live is None or live.done:
            return False
        await self._redis.hset(execution_key(execution_id), "stop_requested", "true")
        now = time.time()
        for task in await self.tasks(execution_id):
            if task.status in (TaskStatus.PENDING, TaskStatus.WAITING):
                stopped = task.model_copy(
                    update={"status": TaskStatus.STOPPED, "finished": now, "waiting_until": None}
                )
                stopped.note("stopped before it ran")
                await self._update(stopped, only_from=(TaskStatus.PENDING, TaskStatus.WAITING))
        await self.finish_if_done(execution_id)
        return True

    async def stop_requested(self, execution_id: str) -> bool:
        flag = await self._redis.hget(execution_key(execution_id), "stop_requested")
        if flag is not None:
            return bool(json.loads(flag))
        execution = await self.execution(execution_id)
        return execution is not None and execution.stop_requested

    async def finish_if_done(self, execution_id: str) -> Execution | None:
        """When no task of a running execution has work left: give it its final status
        (failed if a task failed, else stopped if one was stopped, else succeeded), keep it
        and its tasks in the bucket, free the rule's marker and return it. None otherwise,
        and to every caller but the one that finished it."""
        live = await self._live(execution_id)
        if live is None or live.done or any(live.count(status) for status in TASK_ACTIVE):
            return None
        tasks = await self.tasks(execution_id)
        if any(task.active for task in tasks):
            return None
        counted = _counted(live, tasks)
        if counted.failed:
            status = ExecutionStatus.FAILED
        elif counted.stopped or live.stop_requested:
            status = ExecutionStatus.STOPPED
        else:
            status = ExecutionStatus.SUCCEEDED
        # Derived from the tasks, so two callers racing here write the same record.
        finished = max((task.finished for task in tasks if task.finished), default=None) or time.time()
        final = counted.model_copy(update={"status": status, "finished": max(finished, live.started)})
        await self._keep(ExecutionRecord(execution=final, tasks=tasks))
        closed = await self._redis.eval(
            scripts.FINISH,
            3,
            execution_key(execution_id),
            running_key(live.rule),
            tasks_key(execution_id),
            execution_id,
            json.dumps(status.value),
            json.dumps(final.finished),
            str(FINISHED_TTL_SECONDS),
        )
        return final if closed else None

    # Reading

    async def execution(self, execution_id: str) -> Execution | None:
        """The execution as it is now: from Redis while it runs, else from the bucket."""
        live = await self._live(execution_id)
        if live is not None:
            return await self._unless_interrupted(live)
        record = await self._kept(execution_id)
        return record.execution if record else None

    async def task(self, task_id: str) -> Task | None:
        raw = await self._redis.hget(tasks_key(execution_of(task_id)), task_id)
        if raw is not None:
            return Task.model_validate_json(raw)
        record = await self._kept(execution_of(task_id))
        return next((t for t in record.tasks if t.id == task_id), None) if record else None

    async def tasks(self, execution_id: str) -> list[Task]:
        """The execution's tasks in the order they were planned."""
        stored = cast(dict[bytes, bytes], await self._redis.hgetall(tasks_key(execution_id)))
        if stored:
            return sorted((Task.model_validate_json(raw) for raw in stored.values()), key=_index)
        record = await self._kept(execution_id)
        return record.tasks if record else []

    async def executions(self, rule: str | None = None, limit: int = 50) -> list[Execution]:
        """The newest executions (of one rule, or of all), running and finished, newest first."""
        # Ids sort by start time only to the millisecond: read a few more than asked, so the
        # cut below is made by start time, not by an id's random part.
        wanted = limit + SAME_MILLISECOND_SLACK
        indexed = cast(list[bytes], await self._redis.zrevrange(index_key(rule), 0, wanted - 1))
        live_ids = [_text(i) for i in indexed]
        prefix = layout.replication_rule_executions(rule) if rule else layout.REPLICATION_RULES
        kept = {layout.execution_id_of(key): key for key in await self._objects.list_keys(prefix)}
        newest = sorted({*live_ids, *kept}, reverse=True)[:wanted]
        found = await asyncio.gather(
            *(self._summary(execution_id, kept.get(execution_id)) for execution_id in newest)
        )
        listed = [execution for execution in found if execution is not None]
        listed.sort(key=lambda execution: (execution.started, execution.id), reverse=True)
        return listed[:limit]

    async def _summary(self, execution_id: str, kept_key: str | None) -> Execution | None:
        """Redis first (the live state), then the summary the bucket keeps."""
        live = await self._live(execution_id)
        if live is not None:
            return await self._unless_interrupted(live)
        if kept_key is None:
            return None
        try:
            return Execution.model_validate_json(await self._objects.get_bytes(kept_key))
        except ObjectMissing:
            return None

    async def _live(self, execution_id: str) -> Execution | None:
        stored = cast(dict[bytes, bytes], await self._redis.hgetall(execution_key(execution_id)))
        if not stored:
            return None
        return Execution.model_validate({_text(k): json.loads(v) for k, v in stored.items()})

    async def _record(self, execution_id: str) -> ExecutionRecord | None:
        """The execution with its tasks, from Redis or the bucket."""
        live = await self._live(execution_id)
        if live is not None:
            return ExecutionRecord(execution=live, tasks=await self.tasks(execution_id))
        return await self._kept(execution_id)

    async def _unless_interrupted(self, live: Execution) -> Execution:
        """A running execution with no tasks whose rule's marker no longer names it lost its
        worker while planning, and nothing will plan it now (a redelivered start that finds
        it so starts anew): finished as failed. Tasks published are run and finish their
        execution whenever a worker takes them (a dead worker's come back to the queue)."""
        if live.done or live.total or _text(await self._redis.get(running_key(live.rule)) or "") == live.id:
            return live
        final = live.model_copy(
            update={"status": ExecutionStatus.FAILED, "finished": time.time(), "message": INTERRUPTED}
        )
        # Kept first: should the execution run again meanwhile (a resumed start), its finish rewrites it.
        await self._keep(ExecutionRecord(execution=final))
        keys = (execution_key(live.id), running_key(live.rule))
        ttl = str(FINISHED_TTL_SECONDS)
        if not await self._redis.eval(scripts.INTERRUPT, 2, *keys, live.id, ttl, *_fields(final)):
            return await self._live(live.id) or final
        return final

    # The bucket

    async def _kept(self, execution_id: str) -> ExecutionRecord | None:
        try:
            raw = await self._objects.get_bytes(layout.replication_execution(execution_id))
        except ObjectMissing:
            return None
        return ExecutionRecord.model_validate_json(raw)

    async def _keep(self, record: ExecutionRecord) -> None:
        """Write the record, then its summary under its rule (what listings read)."""
        execution = record.execution
        await self._objects.put_bytes(
            layout.replication_execution(execution.id),
            record.model_dump_json().encode(),
            content_type="application/json",
        )
        await self._objects.put_bytes(
            layout.replication_rule_execution(execution.rule, execution.id),
            execution.model_dump_json().encode(),
            content_type="application/json",
        )
