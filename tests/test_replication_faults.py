"""Replication when workers die: real Dramatiq worker processes SIGKILLed while an execution is
being planned, and while a task copies. Dramatiq's Redis broker gives a dead worker's unacked
messages back to the queue once its heartbeat is older than the broker's heartbeat timeout,
during the queue maintenance a small share of broker commands runs. The tests run that
maintenance themselves (`_redeliver`), with a timeout of seconds, instead of waiting for
the workers' minute and their chance."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker

from shared import jobs
from shared.registry import layout
from shared.replication.records import Execution, ExecutionStatus, Task, TaskStatus
from shared.replication.store import INTERRUPTED, RUNNING_TTL_SECONDS, ExecutionStore, running_key
from tests.fixtures.proxy import CacheStack, StackFactory, WorkerProcess, wait_for
from tests.fixtures.servers import InProcessWorker, WorkerFactory
from tests.support.distribution import Distribution
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import Image
from tests.support.replication import KIB, pull_rule
from tests.support.replication import publish_start as _publish_start
from tests.support.replication import read_executions as _executions
from tests.support.replication import small_image as _image
from tests.support.replication import stack_reader as _reader
from tests.support.replication import tagged as _tagged
from tests.support.seed import push_image

# A worker that has sent no broker command for this long counts as dead. Idle live workers
# fetch about every second, so this is safely longer.
HEARTBEAT_SECONDS = 2.5


def _rule(name: str, repository: str) -> dict[str, Any]:
    """A manual pull rule from the emulated Docker Hub into the hosted project `local`."""
    return pull_rule(name, repository, destination="local")


def _redeliver(redis_url: str) -> None:
    """Dramatiq's queue maintenance, now: the unacked replication messages of workers silent
    for HEARTBEAT_SECONDS go back to their queue; then wake an idle worker for them."""
    broker = RedisBroker(  # type: ignore[no-untyped-call]
        url=redis_url,
        namespace=jobs.NAMESPACE,
        heartbeat_timeout=int(HEARTBEAT_SECONDS * 1000),
        maintenance_chance=MAINTENANCE_SCALE,
    )
    try:
        for queue in (jobs.REPLICATION_QUEUE, f"{jobs.REPLICATION_QUEUE}.DQ"):
            broker.do_qsize(queue)
        broker.client.lpush(jobs.wake_key(jobs.REPLICATION_QUEUE), "1")
    finally:
        broker.close()


def _stack(cache_stack: StackFactory, rule: str, repository: str) -> CacheStack:
    return cache_stack(workers=0, replication=[_rule(rule, repository)])


def _crash(stack: CacheStack) -> None:
    """End the stack's workers at once: nothing of them is kept, no need for a graceful stop."""
    for worker in stack.workers:
        worker.kill()


def _wait_done(
    reader: InProcessWorker, rule: str, timeout: float, logs: Callable[[], str]
) -> list[Execution]:
    """The rule's executions once none of them runs."""
    try:
        wait_for(
            lambda: all(e.done for e in _executions(reader, rule)) and bool(_executions(reader, rule)),
            timeout,
            "every execution of the rule over",
        )
    except Exception as exc:
        raise AssertionError(f"{exc}; executions: {_executions(reader, rule)}\n{logs()}") from exc
    return _executions(reader, rule)


def _replace_worker(stack: CacheStack, doomed: WorkerProcess, redis_url: str) -> None:
    """SIGKILL `doomed`, start another worker, and give the dead one's messages back to the
    queue once its heartbeat has lapsed (as the broker's maintenance would, later)."""
    doomed.kill()
    died = time.monotonic()
    stack.start_worker(threads=2)
    time.sleep(max(0.0, died + HEARTBEAT_SECONDS + 0.2 - time.monotonic()))
    _redeliver(redis_url)


def _finished_with_every_tag(
    reader: InProcessWorker,
    stack: CacheStack,
    rule: str,
    execution_id: str,
    name: str,
    images: dict[str, Image],
) -> Execution:
    """The execution `execution_id` of `rule` ran to success with every tag at the destination
    (the stack is stopped after)."""
    [done] = _wait_done(reader, rule, 20, stack.worker_logs)
    assert done.id == execution_id
    assert (done.status, done.succeeded, done.total) == (ExecutionStatus.SUCCEEDED, 2, 2)
    destination = f"local/{name.split('/', 1)[1]}"
    for tag, image in images.items():
        assert _tagged(reader, destination, tag) == image.digest
    _crash(stack)
    return done


def test_a_start_whose_worker_died_while_planning_is_resumed_when_its_message_comes_back(
    cache_stack: StackFactory,
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    images = {tag: _image(f"{name}:{tag}") for tag in ("v1", "v2")}
    for tag, image in images.items():
        push_image(distribution.url, name, image, tag=tag)
    stack = _stack(cache_stack, "planned", name)
    reader = _reader(worker_factory, stack)
    doomed = stack.start_worker(threads=1)
    # The first tags list hangs: the worker is still planning when it dies.
    hub.stall("tags", 30, times=1)

    _publish_start(redis_url, "planned")
    wait_for(lambda: any(r.kind == "tags" for r in hub.requests), 10, "planning lists the tags")
    [planning] = _executions(reader, "planned")
    assert (planning.status, planning.total) == (ExecutionStatus.RUNNING, 0)
    _replace_worker(stack, doomed, redis_url)

    # The message came back to the other worker: it planned and ran the same execution,
    # rather than finding the rule's marker taken by it and recording a skipped one.
    _finished_with_every_tag(reader, stack, "planned", planning.id, name, images)


def test_a_task_whose_worker_was_killed_mid_copy_is_redelivered_and_the_execution_finishes(
    cache_stack: StackFactory,
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    slow = _image(f"{name}:slow", size=512 * KIB)
    images = {"slow": slow, "quick": _image(f"{name}:quick")}
    for tag, image in images.items():
        push_image(distribution.url, name, image, tag=tag)
    [layer] = [digest for digest, data in slow.blobs.items() if data in slow.layers]
    # Half a MiB at 64 KiB/s: the copy is well under way, not over, when its worker dies.
    hub.throttle_blob(layer, 64 * KIB)
    stack = _stack(cache_stack, "killed", name)
    reader = _reader(worker_factory, stack)
    doomed = stack.start_worker(threads=1)

    _publish_start(redis_url, "killed")
    wait_for(lambda: bool(hub.blob_gets(layer)), 15, "the slow layer being copied")
    time.sleep(0.5)
    [running] = _executions(reader, "killed")
    store = ExecutionStore(reader.context.redis, reader.context.objects)
    [copying] = [t for t in reader.run(store.tasks(running.id)) if t.tag == "slow"]
    assert copying.status is TaskStatus.RUNNING
    hub.throttle_blob(layer, None)
    _replace_worker(stack, doomed, redis_url)

    done = _finished_with_every_tag(reader, stack, "killed", running.id, name, images)
    # The bucket keeps it, the slow task run a second time.
    kept = reader.run(reader.context.objects.get_bytes(layout.replication_execution(done.id)))
    assert b'"succeeded"' in kept
    assert len(hub.blob_gets(layer)) >= 2


def test_an_execution_whose_worker_died_planning_is_finished_as_interrupted_once_its_marker_lapses(
    cache_stack: StackFactory,
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    push_image(distribution.url, name, _image(name), tag="v1")
    stack = _stack(cache_stack, "orphaned", name)
    reader = _reader(worker_factory, stack)
    doomed = stack.start_worker(threads=1)
    hub.stall("tags", 30, times=1)
    _publish_start(redis_url, "orphaned")
    wait_for(lambda: any(r.kind == "tags" for r in hub.requests), 10, "planning lists the tags")
    doomed.kill()
    [orphan] = _executions(reader, "orphaned")
    assert orphan.status is ExecutionStatus.RUNNING
    # Nobody renews the rule's marker now; it lapses (RUNNING_TTL_SECONDS), here at once.
    with redis.Redis.from_url(redis_url) as client:
        assert client.pttl(running_key("orphaned")) > (RUNNING_TTL_SECONDS - 60) * 1000
        client.delete(running_key("orphaned"))

    # Read again, it is over: failed, saying why, kept in the bucket; the rule runs again.
    [seen] = _executions(reader, "orphaned")
    assert (seen.id, seen.status, seen.message) == (orphan.id, ExecutionStatus.FAILED, INTERRUPTED)
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
    store = ExecutionStore(reader.context.redis, reader.context.objects)
    kept = reader.run(store.execution(orphan.id))
    assert kept is not None
    assert (kept.status, kept.message) == (ExecutionStatus.FAILED, INTERRUPTED)
    again = reader.run(store.start("orphaned", "manual"))
    assert again.status is ExecutionStatus.RUNNING


def test_an_execution_with_tasks_outlives_its_marker_and_finishes_when_its_tasks_do(
    worker_factory: WorkerFactory, redis_url: str
) -> None:
    reader = worker_factory()
    store = ExecutionStore(reader.context.redis, reader.context.objects)
    execution = reader.run(store.start("queued", "manual"))
    task = Task(
        id=f"{execution.id}:0",
        execution=execution.id,
        rule="queued",
        source_repository="library/a",
        tag="v1",
        destination_repository="local/a",
    )
    reader.run(store.add_tasks(execution.id, [task]))
    # Its task's message waits in a busy queue longer than the marker lives: the task will
    # still run, so the execution is not taken for interrupted.
    with redis.Redis.from_url(redis_url) as client:
        client.delete(running_key("queued"))
    seen = reader.run(store.execution(execution.id))
    assert seen is not None
    assert seen.status is ExecutionStatus.RUNNING
    reader.run(store.update_task(task.model_copy(update={"status": TaskStatus.SUCCEEDED})))
    finished = reader.run(store.finish_if_done(execution.id))
    assert finished is not None
    assert finished.status is ExecutionStatus.SUCCEEDED


def test_a_start_names_its_request_and_the_same_request_again_resumes_or_starts_anew(
    worker_factory: WorkerFactory, redis_url: str
) -> None:
    reader = worker_factory()
    store = ExecutionStore(reader.context.redis, reader.context.objects)
    first = reader.run(store.start("claimed", "manual", claim="message-1"))
    # The same message again while its execution holds the marker: that execution.
    again = reader.run(store.start("claimed", "manual", claim="message-1"))
    assert (again.id, again.status) == (first.id, ExecutionStatus.RUNNING)
    # Another message meanwhile is skipped, and stays skipped when it comes back.
    other = reader.run(store.start("claimed", "cron", claim="message-2"))
    assert other.status is ExecutionStatus.SKIPPED
    assert reader.run(store.start("claimed", "cron", claim="message-2")).id == other.id
    # Back only after the marker lapsed, with its execution interrupted: a new execution.
    with redis.Redis.from_url(redis_url) as client:
        client.delete(running_key("claimed"))
    late = reader.run(store.start("claimed", "manual", claim="message-1"))
    assert late.id != first.id
    assert late.status is ExecutionStatus.RUNNING
    interrupted = reader.run(store.execution(first.id))
    assert interrupted is not None
    assert (interrupted.status, interrupted.message) == (ExecutionStatus.FAILED, INTERRUPTED)
