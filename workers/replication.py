"""Replication jobs: plan an execution of a rule, run one of its tasks, retry a failed one.

An execution starts with `start_execution` (the REPLICATE job): the rule's running marker
is taken (a trigger that finds another execution of the rule running is recorded as
skipped), the source is listed and one task per tag is added. Its tasks are published a
few at a time (`TASKS_IN_FLIGHT`): each task that ends publishes the next, so one big
execution never takes every worker thread from the fills clients wait for; none is lost to
a worker that dies while publishing (workers/replication_dispatch.py).

A task (`run_task`, the REPLICATE_TASK job) copies its tag at background priority, so its
manifest GETs never touch the quota reserve of client pulls. When the governor refuses,
the task waits (status `waiting`, the execution says until when) and its message comes
back then; other failures are tried again with backoff, `MAX_TASK_ATTEMPTS` times in all,
except those that will not change (a tag gone from the source, a refused push). A running
task checks every few seconds whether its execution was asked to stop. Tasks copying at
the same moment send a blob they share once (the blob gate, shared/replication/
coordination.py). Every step is safe to repeat: a redelivered task copies only what is
missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import structlog
from redis.exceptions import RedisError

from shared.metrics import (
    REPLICATION_BYTES,
    REPLICATION_EXECUTIONS,
    REPLICATION_QUOTA_WAITS,
    REPLICATION_TASKS,
)
from shared.oci.errors import RegistryError
from shared.ratelimit import background
from shared.replication.coordination import (
    RedisBlobGate,
    RedisListedTags,
    destination_scope,
    forget_listed_tags,
    save_listed_tags,
)
from shared.replication.copy import CopyResult, QuotaWait, copy_tag
from shared.replication.endpoints import Destination, Missing, Source, endpoints_for
from shared.replication.records import (
    Execution,
    ExecutionStatus,
    Task,
    TaskStatus,
    execution_of,
    task_id,
)
from shared.replication.rules import ReplicationRule
from shared.replication.run import Only, delete_missing, list_source, retry_failed, tasks_for
from shared.replication.store import ExecutionStore
from shared.upstream import UpstreamFailure
from workers.context import WorkerContext
from workers.replication_dispatch import START, dispatch, publish_stale, publish_tasks

log = structlog.get_logger("worker")

# Tasks of one execution published at a time; each task that ends publishes the next.
TASKS_IN_FLIGHT = 4
# Runs of a task that end in failure before it is failed for good (a retry by hand
# starts the count again); the n-th waits RETRY_SECONDS * 2**(n-1), at most RETRY_MAX_SECONDS.
MAX_TASK_ATTEMPTS = 4
RETRY_SECONDS = 10.0
RETRY_MAX_SECONDS = 600.0
# How often a running task checks for a stop request and saves its log.
WATCH_SECONDS = 2.0
# How often planning and running tasks renew the rule's running marker (it lasts longer).
REFRESH_SECONDS = 60.0
# Error messages kept in a task are cut to this length.
MAX_ERROR_CHARS = 500


class UnknownRule(LookupError):
    """The configuration has no rule of that name (any more)."""


class UnknownTask(LookupError):
    """No execution holds a task of that id (a message older than the records)."""


class _Stopped(Exception):
    """The execution was asked to stop while the task copied."""


def _store(ctx: WorkerContext) -> ExecutionStore:
    return ExecutionStore(ctx.redis, ctx.objects)


def _now_text() -> str:
    return time.strftime("%H:%M:%S", time.gmtime())


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


async def _endpoints(ctx: WorkerContext, rule: ReplicationRule) -> tuple[Source, Destination]:
    return await endpoints_for(
        rule,
        ctx.settings,
        blobs=ctx.blobs,
        repositories=ctx.repositories,
        objects=ctx.objects,
        upstreams=ctx.upstreams,
    )


@contextlib.asynccontextmanager
async def _marker_kept(store: ExecutionStore, execution_id: str) -> AsyncIterator[None]:
    """Renew the rule's running marker while the body runs (planning a large source)."""

    async def renew() -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            with contextlib.suppress(RedisError):
                await store.refresh(execution_id)

    renewing = asyncio.create_task(renew())
    try:
        yield
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing


def _step(rule: ReplicationRule, execution_id: str, index: int, line: str, error: str | None) -> Task:
    """A step of the execution that is not a tag's copy (listing, deleting), as a task with
    no tag: failed with `error`, or succeeded with `line` in its log."""
    now = time.time()
    return Task(
        id=task_id(execution_id, index),
        execution=execution_id,
        rule=rule.name,
        source_repository="",
        tag="",
        destination_repository="",
        status=TaskStatus.FAILED if error else TaskStatus.SUCCEEDED,
        attempts=1,
        started=now,
        finished=now,
        error=error,
        log=[f"{_now_text()} {line}"],
    )


async def _plan(
    ctx: WorkerContext, rule: ReplicationRule, execution: Execution, only: Only | None
) -> list[Task]:
    """The execution's tasks: one per tag, and a step for tags deleted (or a failure to)."""
    source, destination = await _endpoints(ctx, rule)
    listing = await list_source(rule, source, only)
    tasks = tasks_for(rule, listing, execution.id)
    try:
        # Before any task is published: its copy reads them.
        await save_listed_tags(ctx.redis, execution.id, listing.scheme_tags)
    except RedisError as exc:
        # The tasks ask the source for each tag-scheme tag instead.
        log.warning("replication_listed_tags_unsaved", rule=rule.name, execution=execution.id, error=str(exc))
    deleted: list[str] = []
    try:
        # Before any copy is published: the execution must not finish before this step
        # is recorded. It deletes only tags the listing did not find, so the order is safe.
        await delete_missing(rule, listing, destination, deleted.append)
    except Exception as exc:
        error = f"deleting tags whose source is gone failed: {_describe(exc)}"
        tasks.append(_step(rule, execution.id, len(tasks), "; ".join([*deleted, error]), error))
        log.warning("replication_delete_failed", rule=rule.name, execution=execution.id, error=error)
    else:
        if deleted:
            line = f"deleted {len(deleted)} tags whose source is gone: {', '.join(deleted)}"
            tasks.append(_step(rule, execution.id, len(tasks), line, None))
    return tasks


async def start_execution(
    ctx: WorkerContext,
    rule_name: str,
    trigger: str,
    only_repository: str | None = None,
    only_tag: str | None = None,
    *,
    claim: str | None = None,
) -> Execution:
    """Start an execution of the rule (see the module's docstring); the execution as it
    stands once its first tasks are published (or skipped, or over at once). `claim` names
    the request (the job message's id): the same request again resumes the execution it
    started, planning it again (adding only tasks not yet added), as a redelivered message
    must after its worker died while planning."""
    rule = ctx.settings.rule(rule_name)
    if rule is None:
        raise UnknownRule(f"no replication rule named {rule_name!r}")
    store = _store(ctx)
    execution = await store.start(rule.name, trigger, claim=claim)
    bound = log.bind(rule=rule.name, execution=execution.id, trigger=trigger)
    if execution.done:  # skipped; or this request's execution, over already
        if execution.status is ExecutionStatus.SKIPPED:
            REPLICATION_EXECUTIONS.labels(rule.name, ExecutionStatus.SKIPPED.value).inc()
            bound.info("replication_skipped", reason=execution.message)
        return execution
    only = Only(only_repository, only_tag) if only_repository and only_tag else None
    try:
        async with _marker_kept(store, execution.id):
            tasks = await _plan(ctx, rule, execution, only)
    except Exception as exc:
        error = f"listing the source failed: {_describe(exc)}"
        bound.warning("replication_listing_failed", error=error)
        tasks = [_step(rule, execution.id, 0, error, error)]
        await store.set_message(execution.id, error)
    await store.add_tasks(execution.id, tasks)
    bound.info(
        "replication_planned", tasks=len(tasks), only=f"{only_repository}:{only_tag}" if only else None
    )
    if any(task.active for task in tasks):
        await dispatch(ctx, store, execution.id, START, TASKS_IN_FLIGHT)
    else:
        await _finish(ctx, store, execution.id)
    return await store.execution(execution.id) or execution


async def _finish(ctx: WorkerContext, store: ExecutionStore, execution_id: str) -> Execution | None:
    """Close the execution if no task has work left; counted by whoever closes it."""
    finished = await store.finish_if_done(execution_id)
    if finished is not None:
        await forget_listed_tags(ctx.redis, execution_id)
        REPLICATION_EXECUTIONS.labels(finished.rule, finished.status.value).inc()
        log.info(
            "replication_finished",
            rule=finished.rule,
            execution=finished.id,
            status=finished.status.value,
            tasks=finished.total,
            failed=finished.failed,
            bytes=finished.bytes_moved,
            seconds=round(finished.seconds, 1),
        )
    return finished


async def _ended(ctx: WorkerContext, store: ExecutionStore, task: Task) -> None:
    """A task is over: publish the execution's next one (and any a dead worker claimed
    without publishing), or close the execution."""
    await dispatch(ctx, store, task.execution, task.id, 1)
    await publish_stale(ctx, task.execution)
    await _finish(ctx, store, task.execution)


def _permanent(exc: BaseException) -> bool:
    """Failures another attempt will not change."""
    if isinstance(exc, Missing | ValueError):
        return True
    if isinstance(exc, UpstreamFailure):
        if exc.kind == "not_found":
            return True
        return exc.status is not None and 400 <= exc.status < 500 and exc.status not in (408, 429)
    if isinstance(exc, RegistryError):
        return 400 <= exc.status < 500 and exc.status != 429
    return False


async def _copy(ctx: WorkerContext, store: ExecutionStore, rule: ReplicationRule, task: Task) -> CopyResult:
    """copy_tag for the task at background priority, watched: its log is saved as it
    grows, the rule's marker renewed, and a stop request cancels it (raises _Stopped)."""
    source, destination = await _endpoints(ctx, rule)
    lines = 0

    def note(line: str) -> None:
        nonlocal lines
        lines += 1
        task.note(f"{_now_text()} {line}")

    # The copy runs as a task of its own, which takes the priority set here with it.
    with background():
        copying = asyncio.create_task(
            copy_tag(
                source,
                destination,
                task.source_repository,
                task.tag,
                task.destination_repository,
                overwrite=rule.overwrite,
                copy_referrers=rule.copy_referrers,
                bandwidth=rule.bandwidth,
                log=note,
                gate=RedisBlobGate(
                    ctx.redis, destination_scope(rule.mode == "pull", destination.name), owner=task.id
                ),
                listed_tags=RedisListedTags(ctx.redis, task.execution, task.source_repository),
            )
        )
    saved = lines
    renewed = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({copying}, timeout=WATCH_SECONDS)
            if done:
                return copying.result()
            try:
                if await store.stop_requested(task.execution):
                    raise _Stopped
                if lines != saved:
                    saved = lines
                    await store.update_task(task)  # renews the marker too
                    renewed = time.monotonic()
                elif time.monotonic() - renewed > REFRESH_SECONDS:
                    await store.refresh(task.execution)
                    renewed = time.monotonic()
            except RedisError as exc:
                # Redis away for a moment: the copy goes on, the next check tries again.
                log.warning("replication_watch_failed", task=task.id, error=_describe(exc))
    finally:
        if not copying.done():
            copying.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await copying


async def run_task(ctx: WorkerContext, task_id_: str) -> Task:
    """Run one task (see the module's docstring); the task as it stands after this run.

    A task left `pending` or `waiting` with `waiting_until` set is to be run again then
    (the actor's message comes back at that time).
    """
    store = _store(ctx)
    task = await store.task(task_id_)
    if task is None:
        raise UnknownTask(f"no replication task {task_id_}")
    if not task.active:
        # Redelivered after it ended, or stopped before a worker took it.
        await _ended(ctx, store, task)
        return task
    bound = log.bind(rule=task.rule, execution=task.execution, task=task.id)
    rule = ctx.settings.rule(task.rule)
    now = time.time()
    if rule is None or await store.stop_requested(task.execution):
        if rule is None:
            task.status, task.error = TaskStatus.FAILED, f"rule {task.rule!r} is no longer configured"
        else:
            task.status = TaskStatus.STOPPED
        task.finished = now
        task.waiting_until = None
        task.note(f"{_now_text()} {task.error or 'stopped before it ran'}")
        return await _end(ctx, store, task)
    waited = task.status is TaskStatus.WAITING
    task.status = TaskStatus.RUNNING
    task.started = task.started or now
    task.waiting_until = None
    await store.update_task(task)
    try:
        result = await _copy(ctx, store, rule, task)
    except _Stopped:
        task.status = TaskStatus.STOPPED
        task.finished = time.time()
        task.note(f"{_now_text()} stopped while copying")
        bound.info("replication_task_stopped")
        return await _end(ctx, store, task)
    except QuotaWait as wait:
        # copy_tag has logged the wait in the task's log.
        task.status = TaskStatus.WAITING
        task.waiting_until = wait.reopens_at
        REPLICATION_QUOTA_WAITS.labels(task.rule).inc()
        await store.update_task(task)
        await store.set_message(task.execution, str(wait))
        bound.info("replication_task_waiting", reopens_at=wait.reopens_at)
        return task
    except Exception as exc:
        return await _failed(ctx, store, task, exc)
    task.attempts += 1
    task.status = TaskStatus.SUCCEEDED
    task.finished = time.time()
    task.error = None
    task.bytes_moved = result.bytes_moved
    task.blobs_copied = result.blobs_copied
    task.blobs_present = result.blobs_present
    REPLICATION_BYTES.labels(task.rule).inc(result.bytes_moved)
    if waited:
        # The quota this task waited for is back: the execution no longer waits for it.
        await store.set_message(task.execution, None)
    bound.info(
        "replication_task_done",
        bytes=result.bytes_moved,
        blobs_copied=result.blobs_copied,
        blobs_present=result.blobs_present,
        blob_waits=result.blob_waits,
        skipped=result.skipped,
    )
    return await _end(ctx, store, task)


async def _failed(ctx: WorkerContext, store: ExecutionStore, task: Task, exc: Exception) -> Task:
    """A run that failed: failed for good, or pending until its backoff is over."""
    task.attempts += 1
    error = _describe(exc)
    task.error = error
    bound = log.bind(rule=task.rule, execution=task.execution, task=task.id)
    if _permanent(exc) or task.attempts >= MAX_TASK_ATTEMPTS:
        task.status = TaskStatus.FAILED
        task.finished = time.time()
        task.note(f"{_now_text()} attempt {task.attempts} failed: {error}")
        bound.warning("replication_task_failed", attempts=task.attempts, error=error)
        return await _end(ctx, store, task)
    delay = min(RETRY_SECONDS * 2 ** (task.attempts - 1), RETRY_MAX_SECONDS)
    task.status = TaskStatus.PENDING
    task.waiting_until = time.time() + delay
    task.note(f"{_now_text()} attempt {task.attempts} failed: {error}; trying again in {delay:.0f}s")
    await store.update_task(task)
    bound.info("replication_task_retrying", attempts=task.attempts, delay=delay, error=error)
    return task


async def _end(ctx: WorkerContext, store: ExecutionStore, task: Task) -> Task:
    """Record the task's final status, count it, and move the execution on."""
    await store.update_task(task)
    REPLICATION_TASKS.labels(task.rule, task.status.value).inc()
    await _ended(ctx, store, task)
    return task


async def retry_task(ctx: WorkerContext, task_id_: str) -> Task:
    """Run a failed task again (`seawall execution retry`): its execution is reopened if it
    had finished, and the task published with its attempts counted afresh."""
    store = _store(ctx)
    [task] = await retry_failed(store, execution_of(task_id_), [task_id_])
    await publish_tasks(ctx, [task.id])
    return task
