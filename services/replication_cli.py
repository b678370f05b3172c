"""Operator commands on replication: `seawall replicate`, `seawall executions`, `seawall execution`.

They read and change the execution records (Redis while an execution runs, the bucket
after) and publish jobs for the workers; nothing here copies an image itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from redis.asyncio import Redis
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.running import s3_settings
from shared import jobs
from shared.registry.storage import ObjectStore
from shared.replication.records import Execution, ExecutionStatus, Task, TaskStatus
from shared.replication.store import ExecutionStore
from shared.replication.triggers import replicate_args
from shared.settings import Settings

# How often `seawall replicate --wait` reads the execution's progress: often at first, so
# a short run's end is seen at once, then less as the run goes on (a fortieth of the time
# it has taken), up to the longest pause.
POLL_SECONDS = 0.1
POLL_MAX_SECONDS = 1.0
# Exit codes of `seawall replicate --wait`, by how the execution ended.
EXIT_CODES = {
    ExecutionStatus.SUCCEEDED: 0,
    ExecutionStatus.FAILED: 1,
    ExecutionStatus.STOPPED: 1,
    ExecutionStatus.SKIPPED: 2,
}


class CommandError(Exception):
    """What the operator asked cannot be done; the message says why."""


@contextlib.asynccontextmanager
async def records(settings: Settings, redis_url: str) -> AsyncIterator[ExecutionStore]:
    """The execution store over the configured (or the running `seawall up`'s) Redis and bucket."""
    try:
        objects = ObjectStore(s3_settings(settings))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    redis = Redis.from_url(redis_url)
    try:
        yield ExecutionStore(redis, objects)
    finally:
        await redis.aclose()
        objects.close()


def _publish(redis_url: str, job: jobs.Job, args_list: list[tuple[object, ...]]) -> None:
    """One message of `job` per argument tuple (blocking: run it on a thread)."""
    broker = jobs.make_broker(redis_url)
    try:
        for args in args_list:
            jobs.enqueue(broker, job, args)
    finally:
        broker.close()


def when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    minutes, secs = divmod(value, 60)
    hours, minutes = divmod(int(minutes), 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:04.1f}s" if minutes else f"{secs:.1f}s"


def summary(execution: Execution) -> str:
    """One line on an execution: its status, tasks by status, bytes and time."""
    counts = ", ".join(f"{n} {status}" for status in TaskStatus if (n := execution.count(status)))
    line = f"execution {execution.id} of {execution.rule}: {execution.status}, {execution.total} tasks" + (
        f" ({counts})" if counts else ""
    )
    line += f", {size(execution.bytes_moved)} in {seconds(execution.seconds)}"
    return line + (f"; {execution.message}" if execution.message else "")


# `seawall replicate`


async def replicate(settings: Settings, redis_url: str, rule_name: str, wait: bool, console: Console) -> int:
    """Publish a manual run of the rule; with `wait`, follow it to its end (exit code by outcome)."""
    rule = settings.rule(rule_name)
    if rule is None:
        known = ", ".join(r.name for r in settings.replication) or "none"
        raise CommandError(f"no replication rule named {rule_name!r} (rules: {known})")
    if not rule.enabled:
        raise CommandError(f"rule {rule_name!r} is disabled (enabled: false)")
    async with records(settings, redis_url) as store:
        before = {e.id for e in await store.executions(rule.name, limit=20)}
        asked = time.time()
        await asyncio.to_thread(_publish, redis_url, jobs.REPLICATE, [replicate_args(rule.name, "manual")])
        console.print(f"queued a run of {rule.name} at {when(asked)}")
        if not wait:
            return 0
        execution = await _follow(store, rule.name, before, asked, console)
    print(summary(execution))
    return EXIT_CODES.get(execution.status, 1)


async def _follow(
    store: ExecutionStore, rule: str, before: set[str], asked: float, console: Console
) -> Execution:
    """Show the new execution's progress (tasks done, bytes, rate) until it ends."""
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tasks  {task.fields[moved]}  {task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("waiting for a worker", total=None, moved="", rate="")
        following = time.monotonic()
        execution: Execution | None = None
        while True:
            if execution is None:
                # Found among the rule's executions (a listing) once, then read by its id.
                execution = await _started(store, rule, before, asked)
            else:
                execution = await store.execution(execution.id)  # None: look for it again
            if execution is not None:
                done = execution.succeeded + execution.failed + execution.stopped
                elapsed = max(execution.seconds, 0.001)
                progress.update(
                    bar,
                    description=execution.message or f"{execution.id} {execution.status}",
                    total=execution.total or None,
                    completed=done,
                    moved=size(execution.bytes_moved),
                    rate=f"{size(int(execution.bytes_moved / elapsed))}/s",
                )
                if execution.done:
                    return execution
            await asyncio.sleep(poll_pause(time.monotonic() - following))


def poll_pause(elapsed: float) -> float:
    """The pause before the next progress read, `elapsed` seconds into following a run."""
    return min(POLL_MAX_SECONDS, max(POLL_SECONDS, elapsed / 40))


async def _started(store: ExecutionStore, rule: str, before: set[str], asked: float) -> Execution | None:
    """The manual execution of `rule` started after `asked` (not one listed before)."""
    for execution in await store.executions(rule, limit=20):
        # A second of slack: the worker's clock may be a little behind this one.
        if execution.id not in before and execution.trigger == "manual" and execution.started >= asked - 1:
            return execution
    return None


# `seawall executions` and `seawall execution`


async def list_executions(
    settings: Settings, redis_url: str, rule: str | None, limit: int, console: Console
) -> int:
    async with records(settings, redis_url) as store:
        executions = await store.executions(rule, limit=limit)
    table = Table("id", "rule", "trigger", "status", "started", "took", "tasks", "failed", "moved", "message")
    for e in executions:
        table.add_row(
            e.id,
            e.rule,
            e.trigger,
            e.status.value,
            when(e.started),
            seconds(e.seconds),
            f"{e.succeeded}/{e.total}",
            str(e.failed),
            size(e.bytes_moved),
            escape(e.message or ""),
        )
    console.print(table)
    if not executions:
        console.print("no executions" + (f" of {rule}" if rule else ""))
    return 0


def _task_row(task: Task) -> list[str]:
    what = f"{task.source_repository}:{task.tag} -> {task.destination_repository}" if task.tag else "(step)"
    return [
        task.id.rsplit(":", 1)[-1],
        what,
        task.status.value,
        str(task.attempts),
        size(task.bytes_moved),
        f"{task.blobs_copied}/{task.blobs_present}",
        seconds(task.seconds),
        task.error or (f"until {when(task.waiting_until)}" if task.waiting_until else ""),
    ]


async def show_execution(settings: Settings, redis_url: str, execution_id: str, console: Console) -> int:
    """The execution, a table of its tasks, then each task's log."""
    async with records(settings, redis_url) as store:
        execution = await store.execution(execution_id)
        if execution is None:
            raise CommandError(f"no execution {execution_id}")
        tasks = await store.tasks(execution_id)
    console.print(summary(execution), markup=False, highlight=False, soft_wrap=True)
    console.print(
        f"trigger {execution.trigger}, started {when(execution.started)}, finished {when(execution.finished)}"
        + (", stop requested" if execution.stop_requested and not execution.done else "")
    )
    if not tasks:
        return 0
    table = Table("#", "task", "status", "attempts", "moved", "blobs copied/present", "took", "error")
    for task in tasks:
        table.add_row(*(escape(cell) for cell in _task_row(task)))
    console.print(table)
    for task in tasks:
        if task.log:
            what = f"{task.source_repository}:{task.tag}" if task.tag else "step"
            console.print(f"[bold]task {task.id.rsplit(':', 1)[-1]}[/bold] {escape(what)}", highlight=False)
            for line in task.log:
                console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    return 0


async def stop_execution(settings: Settings, redis_url: str, execution_id: str, console: Console) -> int:
    async with records(settings, redis_url) as store:
        if not await store.request_stop(execution_id):
            execution = await store.execution(execution_id)
            if execution is None:
                raise CommandError(f"no execution {execution_id}")
            raise CommandError(f"execution {execution_id} is not running (it is {execution.status})")
        execution = await store.execution(execution_id)
    console.print(
        "stop requested: tasks not yet running are stopped, running ones stop within seconds"
        + (f"\n{summary(execution)}" if execution else ""),
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return 0


async def retry_execution(settings: Settings, redis_url: str, execution_id: str, console: Console) -> int:
    # Imported here: the planning code brings the upstream clients, which the other
    # commands here do not need to start.
    from shared.replication.run import CannotRetry, retry_failed

    async with records(settings, redis_url) as store:
        try:
            tasks = await retry_failed(store, execution_id)
        except CannotRetry as exc:
            raise CommandError(str(exc)) from None
        await asyncio.to_thread(_publish, redis_url, jobs.REPLICATE_TASK, [(task.id,) for task in tasks])
    console.print(f"queued {len(tasks)} failed tasks of {execution_id} again")
    return 0
