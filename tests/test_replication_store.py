"""The execution store against the real Redis and S3 server: one execution of a rule at a
time (a trigger meanwhile is recorded as skipped), counts rolled from task changes, final
statuses, stopping, and history that outlives a flushed Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from redis.asyncio import Redis

from shared.registry.storage import ObjectStore
from shared.replication import records as records_module
from shared.replication import store as store_module
from shared.replication.records import ExecutionStatus, Task, TaskStatus, task_id
from shared.replication.store import ExecutionStore, running_key
from shared.settings import S3Settings

T = TypeVar("T")


def run(redis_url: str, s3_settings: S3Settings, body: Callable[[ExecutionStore, Redis], Awaitable[T]]) -> T:
    async def main() -> T:
        objects = ObjectStore(s3_settings)
        redis = Redis.from_url(redis_url)
        try:
            return await body(ExecutionStore(redis, objects), redis)
        finally:
            await redis.aclose()
            objects.close()

    return asyncio.run(main())


def planned(execution_id: str, rule: str, tags: list[str]) -> list[Task]:
    return [
        Task(
            id=task_id(execution_id, index),
            execution=execution_id,
            rule=rule,
            source_repository="library/python",
            tag=tag,
            destination_repository="mirror/python",
        )
        for index, tag in enumerate(tags)
    ]


def ended(task: Task, status: TaskStatus, moved: int = 0) -> Task:
    done = task.model_copy(
        update={
            "status": status,
            "attempts": 1,
            "bytes_moved": moved,
            "started": 1.0,
            "finished": time.time(),
        }
    )
    done.note(f"{status.value}: {moved} bytes")
    return done


def test_a_trigger_while_the_rule_runs_is_recorded_as_skipped(
    redis_url: str, s3_settings: S3Settings
) -> None:
    async def body(store: ExecutionStore, redis: Redis) -> None:
        first = await store.start("python-slim", "cron")
        assert first.status is ExecutionStatus.RUNNING
        assert await redis.get(running_key("python-slim")) == first.id.encode()
        other_rule = await store.start("node", "manual")
        assert other_rule.status is ExecutionStatus.RUNNING, "rules run independently"

        skipped = await store.start("python-slim", "manual")
        assert skipped.status is ExecutionStatus.SKIPPED
        assert skipped.id != first.id
        assert skipped.message is not None
        assert first.id in skipped.message
        await redis.flushdb()
        # Kept in the bucket at once: it outlives Redis.
        assert await store.execution(skipped.id) == skipped

    run(redis_url, s3_settings, body)


def test_the_rule_runs_again_once_its_execution_is_finished(redis_url: str, s3_settings: S3Settings) -> None:
    async def body(store: ExecutionStore, redis: Redis) -> None:
        first = await store.start("r", "manual")
        [task] = planned(first.id, "r", ["1"])
        await store.add_tasks(first.id, [task])
        assert (await store.start("r", "manual")).status is ExecutionStatus.SKIPPED
        await store.update_task(ended(task, TaskStatus.SUCCEEDED))
        assert await store.finish_if_done(first.id) is not None
        assert await redis.get(running_key("r")) is None
        assert (await store.start("r", "manual")).status is ExecutionStatus.RUNNING

    run(redis_url, s3_settings, body)


def test_a_marker_left_by_an_execution_that_is_gone_does_not_block_the_rule(
    redis_url: str, s3_settings: S3Settings
) -> None:
    async def body(store: ExecutionStore, redis: Redis) -> None:
        await redis.set(running_key("r"), "20260101T000000Z-dead00", px=600_000)
        execution = await store.start("r", "cron")
        assert execution.status is ExecutionStatus.RUNNING
        assert await redis.get(running_key("r")) == execution.id.encode()

    run(redis_url, s3_settings, body)


def test_counts_and_bytes_roll_up_from_concurrent_task_changes(
    redis_url: str, s3_settings: S3Settings
) -> None:
    async def body(store: ExecutionStore, redis: Redis) -> None:
        execution = await store.start("r", "manual")
        tasks = planned(execution.id, "r", [f"t{i}" for i in range(40)])
        await store.add_tasks(execution.id, tasks)
        await store.add_tasks(execution.id, tasks[:5])  # a redelivered start adds nothing twice
        live = await store.execution(execution.id)
        assert live is not None
        assert (live.total, live.pending) == (40, 40)

        running = [t.model_copy(update={"status": TaskStatus.RUNNING}) for t in tasks]
        await asyncio.gather(*(store.update_task(t) for t in running))
        outcomes = [TaskStatus.SUCCEEDED] * 30 + [TaskStatus.FAILED] * 10
        await asyncio.gather(
            *(store.update_task(ended(t, s, 1000)) for t, s in zip(running, outcomes, strict=True))
        )
        live = await store.execution(execution.id)
        assert live is not None
        assert (live.pending, live.running, live.succeeded, live.failed, live.bytes_moved) == (
            0,
            0,
            30,
            10,
            40_000,
        )
        # A retry that moves more bytes counts only the difference.
        await store.update_task(ended(running[0], TaskStatus.SUCCEEDED, 1500))
        live = await store.execution(execution.id)
        assert live is not None
        assert live.bytes_moved == 40_500

    run(redis_url, s3_settings, body)


def test_finish_if_done_waits_for_every_task_and_names_the_outcome(
    redis_url: str, s3_settings: S3Settings
) -> None:
    async def outcome(store: ExecutionStore, rule: str, statuses: list[TaskStatus]) -> ExecutionStatus:
        execution = await store.start(rule, "manual")
        tasks = planned(execution.id, rule, [f"t{i}" for i in range(len(statuses))])
        await store.add_tasks(execution.id, tasks)
        for task, status in zip(tasks, statuses, strict=True):
            assert await store.finish_if_done(execution.id) is None, "a task still has work"
            await store.update_task(ended(task, status))
        finished = await store.finish_if_done(execution.id)
        assert finished is not None
        assert finished.finished is not None
        assert await store.finish_if_done(execution.id) is None, "only one caller finishes it"
        return finished.status

    async def body(store: ExecutionStore, redis: Redis) -> None:
        assert (
            await outcome(store, "a", [TaskStatus.SUCCEEDED, TaskStatus.SUCCEEDED])
            is ExecutionStatus.SUCCEEDED
        )
        assert await outcome(store, "b", [TaskStatus.SUCCEEDED, TaskStatus.FAILED]) is ExecutionStatus.FAILED
        assert (
            await outcome(store, "c", [TaskStatus.STOPPED, TaskStatus.SUCCEEDED]) is ExecutionStatus.STOPPED
        )
        assert await outcome(store, "d", [TaskStatus.STOPPED, TaskStatus.FAILED]) is ExecutionStatus.FAILED
        assert await outcome(store, "e", []) is ExecutionStatus.SUCCEEDED, "nothing to copy is a success"

    run(redis_url, s3_settings, body)


def test_a_redis_flush_after_finishing_loses_no_history(redis_url: str, s3_settings: S3Settings) -> None:
    async def body(store: ExecutionStore, redis: Redis) -> None:
        older = await store.start("r", "cron")
        await store.add_tasks(older.id, [])
        await store.finish_if_done(older.id)
        execution = await store.start("r", "manual")
        tasks = planned(execution.id, "r", ["3.12-slim", "3.13-slim"])
        await store.add_tasks(execution.id, tasks)
        for line in range(30):
            tasks[0].note(f"line {line}")
        await store.update_task(ended(tasks[0], TaskStatus.SUCCEEDED, 5_000))
        await store.update_task(ended(tasks[1], TaskStatus.FAILED, 10))
        finished = await store.finish_if_done(execution.id)
        assert finished is not None
        kept_tasks = await store.tasks(execution.id)
        assert len(kept_tasks[0].log) == 20, "a task keeps the last lines of its log"
        assert kept_tasks[0].log[-1] == "succeeded: 5000 bytes"

        await redis.flushdb()
        assert await store.execution(execution.id) == finished
        assert finished.status is ExecutionStatus.FAILED
        assert (finished.total, finished.succeeded, finished.failed, finished.bytes_moved) == (2, 1, 1, 5_010)
        assert await store.tasks(execution.id) == kept_tasks
        assert await store.task(tasks[1].id) == kept_tasks[1]
        assert [e.id for e in await store.executions()] == [execution.id, older.id]
        assert [e.id for e in await store.executions("r", limit=1)] == [execution.id]
        assert await store.executions("other") == []

    run(redis_url, s3_settings, body)


def test_executions_lists_running_and_finished_ones_newest_first(
    redis_url: str, s3_settings: S3Settings
) -> None:
    async def body(store: ExecutionStore, redis: Redis) -> None:
        done = await store.start("a", "manual")
        await store.finish_if_done(done.id)
        running = await store.start("b", "manual")
        skipped = await store.start("b", "cron")
        listed = await store.executions()
        # By start time, not by id: ids sort only to the millisecond, and these three
        # often start within one.
        assert [e.id for e in listed] == [skipped.id, running.id, done.id]
        assert {e.id: e.status for e in listed} == {
            done.id: ExecutionStatus.SUCCEEDED,
            running.id: ExecutionStatus.RUNNING,
            skipped.id: ExecutionStatus.SKIPPED,
        }
        assert {e.id for e in await store.executions("b")} == {running.id, skipped.id}

    run(redis_url, s3_settings, body)


class SameMillisecondClock:
    """`time.time()` for the store: the current millisecond, ten microseconds further on
    each call, so every execution started under it shares its id's millisecond."""

    def __init__(self) -> None:
        self._now = int(time.time() * 1000) / 1000

    def time(self) -> float:
        self._now += 0.00001
        return self._now


class DescendingSuffixes:
    """`secrets.token_hex` for execution ids: each id's random part sorts before the one
    before it (and never repeats), so an order by id is the reverse of the start order."""

    def __init__(self) -> None:
        self._next = 0x10000000

    def token_hex(self, nbytes: int) -> str:
        self._next -= 1
        return f"{self._next:0{nbytes * 2}x}"


def test_executions_started_within_one_millisecond_are_listed_by_start_time(
    redis_url: str, s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ids sort only to the millisecond (a random part follows): within one, the start time orders.
    monkeypatch.setattr(store_module, "time", SameMillisecondClock())
    monkeypatch.setattr(records_module, "secrets", DescendingSuffixes())

    async def body(store: ExecutionStore, redis: Redis) -> None:
        started = [await store.start(f"rule-{n}", "manual") for n in range(5)]
        assert len({e.id[:-8] for e in started}) == 1, "one millisecond"
        assert [e.id for e in started] == sorted((e.id for e in started), reverse=True)
        assert [e.id for e in await store.executions()] == [e.id for e in reversed(started)]
        # A limit cuts by start time too: the newest two, not the two largest ids.
        assert [e.id for e in await store.executions(limit=2)] == [started[4].id, started[3].id]

    run(redis_url, s3_settings, body)


def test_stopping_stops_what_has_not_started_and_finishes_when_the_running_task_ends(
    redis_url: str, s3_settings: S3Settings
) -> None:
    async def body(store: ExecutionStore, redis: Redis) -> None:
        execution = await store.start("r", "manual")
        tasks = planned(execution.id, "r", ["a", "b", "c"])
        await store.add_tasks(execution.id, tasks)
        await store.update_task(tasks[0].model_copy(update={"status": TaskStatus.RUNNING}))
        waiting = tasks[1].model_copy(
            update={"status": TaskStatus.WAITING, "waiting_until": time.time() + 3600}
        )
        await store.update_task(waiting)
        assert not await store.stop_requested(execution.id)

        assert await store.request_stop(execution.id)
        assert await store.stop_requested(execution.id)
        statuses = [t.status for t in await store.tasks(execution.id)]
        assert statuses == [TaskStatus.RUNNING, TaskStatus.STOPPED, TaskStatus.STOPPED]
        live = await store.execution(execution.id)
        assert live is not None
        assert live.status is ExecutionStatus.RUNNING, "a task still runs"

        await store.update_task(ended(tasks[0], TaskStatus.STOPPED))
        finished = await store.finish_if_done(execution.id)
        assert finished is not None
        assert finished.status is ExecutionStatus.STOPPED
        assert finished.stop_requested
        assert not await store.request_stop(execution.id), "it is no longer running"

    run(redis_url, s3_settings, body)


def test_a_finished_execution_reopens_to_retry_its_failed_tasks_even_after_a_flush(
    redis_url: str, s3_settings: S3Settings
) -> None:
    async def body(store: ExecutionStore, redis: Redis) -> None:
        execution = await store.start("r", "manual")
        tasks = planned(execution.id, "r", ["a", "b"])
        await store.add_tasks(execution.id, tasks)
        await store.update_task(ended(tasks[0], TaskStatus.SUCCEEDED, 100))
        await store.update_task(ended(tasks[1], TaskStatus.FAILED))
        await store.finish_if_done(execution.id)
        await redis.flushdb()

        reopened = await store.reopen(execution.id)
        assert reopened is not None
        assert reopened.status is ExecutionStatus.RUNNING
        assert (reopened.succeeded, reopened.failed, reopened.bytes_moved) == (1, 1, 100)
        assert (await store.start("r", "manual")).status is ExecutionStatus.SKIPPED
        retried = await store.task(tasks[1].id)
        assert retried is not None
        await store.update_task(retried.model_copy(update={"status": TaskStatus.PENDING, "error": None}))
        await store.update_task(ended(retried, TaskStatus.SUCCEEDED, 50))
        finished = await store.finish_if_done(execution.id)
        assert finished is not None
        assert finished.status is ExecutionStatus.SUCCEEDED
        assert finished.bytes_moved == 150

    run(redis_url, s3_settings, body)
