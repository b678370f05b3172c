"""Replication executions run in-process (workers/replication.py): each job function is called
with a WorkerContext against the real Redis, the real S3 server and the Docker Hub emulator,
and the jobs an execution publishes are taken from the real queue and run in turn, as
workers would. Also the CLI over the same records."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from services.cli import main as seawall
from shared import jobs
from shared.metrics import REPLICATION_EXECUTIONS, REPLICATION_QUOTA_WAITS
from shared.oci.digest import Digest
from shared.replication.records import ExecutionStatus, Task, TaskStatus
from shared.settings import S3Settings
from tests.fixtures.servers import InProcessWorker, WorkerFactory
from tests.support.distribution import Distribution
from tests.support.dockerhub import DockerHubEmulator
from tests.support.replication import (
    KIB,
    TIMEOUTS,
    drain,
    execution_store,
    flattened,
    pull_replicator,
    pull_rule,
    push_small_images,
    read_execution,
    read_executions,
    small_image,
    stored,
    tagged,
    take_messages,
)
from tests.support.seed import push_image
from workers import replication
from workers.replication import MAX_TASK_ATTEMPTS, TASKS_IN_FLIGHT, run_task, start_execution


def test_a_pull_run_copies_exactly_the_matching_tags_and_a_rerun_moves_no_bytes(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    images = push_small_images(distribution.url, name, ["3.12-slim", "3.13-slim", "3.13-rc1-slim", "3.13"])
    filters = {"name": name, "tag": ["3.12*-slim", "3.13*-slim"], "exclude_tag": "*-rc*"}
    worker = pull_replicator(worker_factory, hub, [pull_rule("slim", name, filters=filters)])
    ctx = worker.context
    hub.reset_counters()

    execution = worker.run(start_execution(ctx, "slim", "manual"))
    assert (execution.status, execution.total) == (ExecutionStatus.RUNNING, 2)
    tasks = drain(worker, redis_url)
    assert sorted(task.tag for task in tasks) == ["3.12-slim", "3.13-slim"]
    done = read_execution(worker, execution.id)
    assert (done.status, done.succeeded, done.failed) == (ExecutionStatus.SUCCEEDED, 2, 0)
    assert done.bytes_moved == sum(
        len(b) for tag in ("3.12-slim", "3.13-slim") for b in images[tag].blobs.values()
    )
    destination = flattened("mirror", name)
    for tag in ("3.12-slim", "3.13-slim"):
        assert tagged(worker, destination, tag) == images[tag].digest
        for digest, data in images[tag].blobs.items():
            assert stored(worker, destination, digest) == data
    assert tagged(worker, destination, "3.13-rc1-slim") is None
    assert tagged(worker, destination, "3.13") is None

    pulls = hub.pulls()
    again = worker.run(start_execution(ctx, "slim", "manual"))
    rerun = drain(worker, redis_url)
    assert [task.bytes_moved for task in rerun] == [0, 0]
    assert read_execution(worker, again.id).status is ExecutionStatus.SUCCEEDED
    # The destination tags already point at the source's digests (HEADs): no manifest GET.
    assert hub.pulls() == pulls


def test_delete_missing_deletes_the_destination_tags_whose_source_is_gone_and_only_those(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    image = small_image(name)
    push_image(distribution.url, name, image, tag="v1")
    rule = pull_rule("mirrored", name, filters={"name": name, "tag": "v*"}, delete_missing=True)
    worker = pull_replicator(worker_factory, hub, [rule])
    ctx = worker.context
    destination = flattened("mirror", name)
    worker.run(start_execution(ctx, "mirrored", "manual"))
    drain(worker, redis_url)
    assert tagged(worker, destination, "v1") == image.digest
    # Tags at the destination the source does not have: one the rule copies (v0), one it
    # does not (local), and a signature under the referrer tag scheme.
    signature = f"sha256-{image.digest.split(':')[1]}.sig"
    for tag in ("v0", "local", signature):
        worker.run(ctx.repositories.set_tag(destination, tag, Digest.parse(image.digest)))

    execution = worker.run(start_execution(ctx, "mirrored", "manual"))
    drain(worker, redis_url)
    assert tagged(worker, destination, "v0") is None
    for tag in ("v1", "local", signature):
        assert tagged(worker, destination, tag) == image.digest
    tasks = worker.run(execution_store(worker).tasks(execution.id))
    [step] = [task for task in tasks if not task.tag]
    assert step.status is TaskStatus.SUCCEEDED
    assert f"{destination}:v0" in step.log[0]
    assert read_execution(worker, execution.id).status is ExecutionStatus.SUCCEEDED


def test_a_trigger_while_the_rule_runs_is_recorded_as_skipped(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    push_image(distribution.url, name, small_image(name), tag="v1")
    worker = pull_replicator(worker_factory, hub, [pull_rule("busy", name)])
    skipped = REPLICATION_EXECUTIONS.labels("busy", "skipped")._value.get()

    running = worker.run(start_execution(worker.context, "busy", "manual"))
    second = worker.run(start_execution(worker.context, "busy", "cron"))
    assert second.status is ExecutionStatus.SKIPPED
    assert second.message is not None
    assert running.id in second.message
    assert REPLICATION_EXECUTIONS.labels("busy", "skipped")._value.get() == skipped + 1
    # The skipped one is recorded; the running one goes on and finishes.
    assert read_execution(worker, second.id).status is ExecutionStatus.SKIPPED
    drain(worker, redis_url)
    assert read_execution(worker, running.id).status is ExecutionStatus.SUCCEEDED
    # Once it is over, the rule runs again.
    third = worker.run(start_execution(worker.context, "busy", "cron"))
    assert third.status is ExecutionStatus.RUNNING


def test_an_execution_publishes_a_few_tasks_at_a_time_and_each_task_that_ends_the_next(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    tags = [f"v{n}" for n in range(TASKS_IN_FLIGHT + 2)]
    push_small_images(distribution.url, name, tags, size=KIB)
    worker = pull_replicator(worker_factory, hub, [pull_rule("many", name)])

    execution = worker.run(start_execution(worker.context, "many", "manual"))
    assert execution.total == len(tags)
    first = take_messages(redis_url)
    assert len(first) == TASKS_IN_FLIGHT
    task = worker.run(run_task(worker.context, first[0]["args"][0]))
    assert task.status is TaskStatus.SUCCEEDED
    # That task ended: the next one in planned order is published, and only it.
    [following] = take_messages(redis_url)
    assert following["args"] == [f"{execution.id}:{TASKS_IN_FLIGHT}"]
    for message in [*first[1:], following]:
        worker.run(run_task(worker.context, message["args"][0]))
    drain(worker, redis_url)
    done = read_execution(worker, execution.id)
    assert (done.status, done.succeeded) == (ExecutionStatus.SUCCEEDED, len(tags))


def test_stopping_an_execution_stops_its_pending_tasks_at_once_and_a_running_copy_within_seconds(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    slow = small_image(f"{name}:slow", size=256 * KIB)
    push_image(distribution.url, name, slow, tag="slow")
    push_image(distribution.url, name, small_image(f"{name}:quick"), tag="quick")
    # The slow image's layer would take 8 s to come from the upstream.
    hub.throttle_blob(next(d for d, b in slow.blobs.items() if b in slow.layers), 32 * KIB)
    worker = pull_replicator(worker_factory, hub, [pull_rule("stoppable", name)])
    ctx = worker.context
    execution = worker.run(start_execution(ctx, "stoppable", "manual"))
    messages = {message["args"][0] for message in take_messages(redis_url)}
    tasks = worker.run(execution_store(worker).tasks(execution.id))
    [slow_task] = [task.id for task in tasks if task.tag == "slow"]
    store = execution_store(worker)

    async def stop_while_copying() -> tuple[Task, float]:
        running = asyncio.create_task(run_task(ctx, slow_task))
        for _ in range(200):
            found = await store.task(slow_task)
            if found is not None and found.status is TaskStatus.RUNNING:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        asked = time.monotonic()
        assert await store.request_stop(execution.id)
        # The task not yet taken by a worker is stopped at once.
        [quick] = [t for t in await store.tasks(execution.id) if t.tag == "quick"]
        assert quick.status is TaskStatus.STOPPED
        task = await running
        return task, time.monotonic() - asked

    task, took = worker.run(stop_while_copying())
    assert task.status is TaskStatus.STOPPED
    assert took < replication.WATCH_SECONDS + 1.5
    assert any("stopped while copying" in line for line in task.log)
    assert read_execution(worker, execution.id).status is ExecutionStatus.STOPPED
    # The stopped task's message, taken by a worker later, does nothing.
    for task_id in messages - {slow_task}:
        assert worker.run(run_task(ctx, task_id)).status is TaskStatus.STOPPED
    assert tagged(worker, flattened("mirror", name), "slow") is None


def test_tasks_wait_for_the_quota_instead_of_failing_without_drawing_a_429(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    tags = [f"v{n}" for n in range(6)]
    push_small_images(distribution.url, name, tags, size=KIB)
    hub.set_quota(limit=5, window_seconds=3600)
    worker = pull_replicator(
        worker_factory, hub, [pull_rule("quota", name)], quota={"limit": 5, "window": "1h", "reserve": 0.2}
    )
    waits = REPLICATION_QUOTA_WAITS.labels("quota")._value.get()
    hub.reset_counters()

    execution = worker.run(start_execution(worker.context, "quota", "manual"))
    drain(worker, redis_url)
    tasks = worker.run(execution_store(worker).tasks(execution.id))
    statuses = sorted(task.status.value for task in tasks)
    # Background work spends only above the reserve (one pull of five): four tags copied,
    # the other two wait for the window to reopen.
    assert statuses == ["succeeded"] * 4 + ["waiting"] * 2
    assert all(task.waiting_until and task.waiting_until > time.time() for task in tasks if task.active)
    running = read_execution(worker, execution.id)
    assert running.status is ExecutionStatus.RUNNING
    assert running.message is not None
    assert running.message.startswith("waiting for quota")
    assert REPLICATION_QUOTA_WAITS.labels("quota")._value.get() == waits + 2
    assert [r for r in hub.requests if r.status == 429] == []
    # A client pull still gets the reserve.
    client = worker.run(worker.context.upstreams.client("hub"))
    fetched = worker.run(client.get_manifest(name, tags[-1]))
    assert fetched is not None


def test_a_waiting_task_runs_once_the_window_refills_and_the_execution_finishes(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    tags = [f"v{n}" for n in range(3)]
    push_small_images(distribution.url, name, tags, size=KIB)
    # Three pulls in two seconds: background work may take two (the reserve keeps one).
    hub.set_quota(limit=3, window_seconds=2)
    worker = pull_replicator(
        worker_factory, hub, [pull_rule("refill", name)], quota={"limit": 3, "window": "2s", "reserve": 0.2}
    )
    hub.reset_counters()

    execution = worker.run(start_execution(worker.context, "refill", "manual"))
    drain(worker, redis_url)
    [task] = [t for t in worker.run(execution_store(worker).tasks(execution.id)) if t.active]
    assert task.status is TaskStatus.WAITING
    # The actor's message comes back when the task says, until the window has refilled.
    deadline = time.monotonic() + 10
    while task.status is TaskStatus.WAITING and time.monotonic() < deadline:
        assert task.waiting_until is not None
        time.sleep(max(0.0, task.waiting_until - time.time()))
        task = worker.run(run_task(worker.context, task.id))
    assert task.status is TaskStatus.SUCCEEDED
    done = read_execution(worker, execution.id)
    assert (done.status, done.succeeded) == (ExecutionStatus.SUCCEEDED, len(tags))
    assert done.message is None
    assert [r for r in hub.requests if r.status == 429] == []


def test_a_failing_task_is_retried_with_backoff_then_fails_and_a_retry_by_hand_finishes_it(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    image = small_image(name)
    push_image(distribution.url, name, image, tag="v1")
    worker = pull_replicator(worker_factory, hub, [pull_rule("flaky", name)])
    ctx = worker.context
    hub.fail_always(500, kind="blob")

    execution = worker.run(start_execution(ctx, "flaky", "manual"))
    [message] = take_messages(redis_url)
    task_id = message["args"][0]
    for attempt in range(1, MAX_TASK_ATTEMPTS):
        task = worker.run(run_task(ctx, task_id))
        assert (task.status, task.attempts) == (TaskStatus.PENDING, attempt)
        # Backoff doubles from RETRY_SECONDS; the actor's message comes back then.
        expected = replication.RETRY_SECONDS * 2 ** (attempt - 1)
        assert task.waiting_until is not None
        assert expected - 2 < task.waiting_until - time.time() <= expected
        assert task.error is not None
        assert "500" in task.error
    task = worker.run(run_task(ctx, task_id))
    assert (task.status, task.attempts) == (TaskStatus.FAILED, MAX_TASK_ATTEMPTS)
    assert read_execution(worker, execution.id).status is ExecutionStatus.FAILED

    hub.clear_faults()
    retried = worker.run(replication.retry_task(ctx, task_id))
    assert (retried.status, retried.attempts) == (TaskStatus.PENDING, 0)
    assert read_execution(worker, execution.id).status is ExecutionStatus.RUNNING
    [task] = drain(worker, redis_url)
    assert task.status is TaskStatus.SUCCEEDED
    assert read_execution(worker, execution.id).status is ExecutionStatus.SUCCEEDED
    assert tagged(worker, flattened("mirror", name), "v1") == image.digest


def test_a_tag_gone_from_the_source_fails_its_task_without_retries(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    push_image(distribution.url, name, small_image(name), tag="v1")
    worker = pull_replicator(worker_factory, hub, [pull_rule("gone", name)])
    execution = worker.run(start_execution(worker.context, "gone", "manual"))
    # As if the tag were deleted between planning and copying.
    hub.fail_always(404, kind="manifest")
    [task] = drain(worker, redis_url)
    assert (task.status, task.attempts) == (TaskStatus.FAILED, 1)
    assert read_execution(worker, execution.id).status is ExecutionStatus.FAILED


def test_a_source_that_cannot_be_listed_fails_the_execution_saying_why(
    worker_factory: WorkerFactory, hub: DockerHubEmulator, redis_url: str
) -> None:
    worker = pull_replicator(worker_factory, hub, [pull_rule("unlisted", "library/python")])
    hub.fail_always(503, kind="tags")
    hub.fail_always(503, kind="other")
    execution = worker.run(start_execution(worker.context, "unlisted", "manual"))
    assert execution.status is ExecutionStatus.FAILED
    assert execution.message is not None
    assert execution.message.startswith("listing the source failed")
    assert take_messages(redis_url) == []


# The CLI


def _config(tmp_path: Path, redis_url: str, s3: S3Settings, hub_url: str, rules: list[Any]) -> Path:
    path = tmp_path / "seawall.yaml"
    settings = {
        "redis_url": redis_url,
        "s3": {
            "endpoint": s3.endpoint,
            "access_key": s3.access_key,
            "secret_key": s3.secret_key.get_secret_value(),
            "bucket": s3.bucket,
            "secure": s3.secure,
        },
        "data_dir": str(tmp_path / "cli"),
        "upstreams": [{"name": "hub", "url": hub_url, "flavor": "dockerhub", **TIMEOUTS}],
        "projects": [{"name": "mirror", "type": "hosted"}],
        "replication": rules,
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def test_the_cli_starts_follows_lists_shows_retries_and_stops_executions(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
    s3_settings: S3Settings,
    tmp_path: Path,
) -> None:
    name = repo_name()
    push_image(distribution.url, name, small_image(name), tag="v1")
    rules = [pull_rule("cli", name)]
    worker = pull_replicator(worker_factory, hub, rules)
    config = str(_config(tmp_path, redis_url, s3_settings, hub.url, rules))
    runner = CliRunner()
    hub.fail_always(500, kind="blob")

    # `seawall replicate --wait` while a worker (a thread here) runs what it queued.
    answered = threading.Event()

    def work() -> None:
        while not answered.is_set() and not _drain_failing(worker, redis_url):
            time.sleep(0.05)

    worker_thread = threading.Thread(target=work)
    worker_thread.start()
    try:
        followed = runner.invoke(seawall, ["replicate", "cli", "--wait", "--config", config])
    finally:
        answered.set()
        worker_thread.join()
    assert followed.exit_code == 1, followed.output
    assert "queued a run of cli" in followed.output
    [execution] = read_executions(worker, "cli")
    assert f"execution {execution.id} of cli: failed, 1 tasks (1 failed)" in followed.output

    listed = runner.invoke(seawall, ["executions", "cli", "--config", config])
    assert listed.exit_code == 0, listed.output
    assert execution.id in listed.output
    assert "failed" in listed.output

    shown = runner.invoke(seawall, ["execution", execution.id, "--config", config])
    assert shown.exit_code == 0, shown.output
    assert f"{name}:v1" in shown.output
    assert f"attempt {MAX_TASK_ATTEMPTS} failed" in shown.output  # the task's log

    hub.clear_faults()
    retried = runner.invoke(seawall, ["execution", "retry", execution.id, "--config", config])
    assert retried.exit_code == 0, retried.output
    assert "queued 1 failed tasks" in retried.output
    # Stopped before a worker takes it again: the retried task is stopped at once.
    stopped = runner.invoke(seawall, ["execution", "stop", execution.id, "--config", config])
    assert stopped.exit_code == 0, stopped.output
    assert read_execution(worker, execution.id).status is ExecutionStatus.STOPPED
    again = runner.invoke(seawall, ["execution", "stop", execution.id, "--config", config])
    assert again.exit_code == 1
    assert "is not running" in again.output
    unknown = runner.invoke(seawall, ["execution", "20260101T000000Z-000000", "--config", config])
    assert unknown.exit_code == 1
    assert "no execution" in unknown.output


def _drain_failing(worker: InProcessWorker, redis_url: str) -> bool:
    """Run what is queued; a task backing off is run again at once (no waiting in a test).
    True once an execution has been started and all its tasks have ended."""
    ran = False
    while messages := take_messages(redis_url):
        for message in messages:
            if message["actor_name"] == jobs.REPLICATE.actor:
                worker.run(start_execution(worker.context, *message["args"]))
                continue
            task = worker.run(run_task(worker.context, *message["args"]))
            while task.active:
                task = worker.run(run_task(worker.context, task.id))
            ran = True
    return ran


def test_replicate_refuses_an_unknown_or_disabled_rule(
    redis_url: str, s3_settings: S3Settings, tmp_path: Path
) -> None:
    rules = [pull_rule("off", "library/python", enabled=False)]
    config = str(_config(tmp_path, redis_url, s3_settings, "http://127.0.0.1:9", rules))
    runner = CliRunner()
    unknown = runner.invoke(seawall, ["replicate", "nope", "--config", config])
    assert unknown.exit_code == 1
    assert "no replication rule named 'nope' (rules: off)" in unknown.output
    disabled = runner.invoke(seawall, ["replicate", "off", "--config", config])
    assert disabled.exit_code == 1
    assert "disabled" in disabled.output
    assert take_messages(redis_url) == []
