"""Replication tasks sharing work (workers/replication.py, workers/replication_dispatch.py,
shared/replication/coordination.py), run in-process on a WorkerContext against the real
Redis, the real S3 server and the Docker Hub emulator: a blob shared by tasks running at
once goes up once, a re-run asks the source one manifest HEAD per tag, and tasks claimed by
a worker that died before publishing them are published again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from redis.asyncio import Redis

from services.processes import free_port
from shared.leases import Lease
from shared.replication.coordination import (
    GATE_TTL_SECONDS,
    RedisBlobGate,
    RedisListedTags,
    destination_scope,
    gate_key,
)
from shared.replication.copy import CopyResult, copy_tag
from shared.replication.records import ExecutionStatus, Task, TaskStatus
from shared.replication.run import Listing, tasks_for
from tests.fixtures.servers import InProcessWorker, WorkerFactory
from tests.support.distribution import Distribution
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import Image, make_image, make_layer, sha256
from tests.support.replication import (
    KIB,
    drain,
    execution_store,
    pull_replicator,
    pull_rule,
    read_execution,
    rule_endpoints,
    tagged,
    take_messages,
)
from tests.support.seed import push_image
from workers.replication import TASKS_IN_FLIGHT, run_task, start_execution
from workers.replication_dispatch import STALE_CLAIM_SECONDS, START, claim, dispatch


def _replicator(
    worker_factory: WorkerFactory, hub: DockerHubEmulator, rule: str, name: str
) -> InProcessWorker:
    """A worker with a manual pull rule `rule` from the emulator's `name` into project `mirror`."""
    return pull_replicator(worker_factory, hub, [pull_rule(rule, name)])


def _status(worker: InProcessWorker, execution_id: str) -> ExecutionStatus:
    return read_execution(worker, execution_id).status


def _image(label: str, *shared: bytes) -> Image:
    return make_image([*shared, make_layer(size=2 * KIB, seed=label)], label=label)


def test_tasks_running_at_once_send_a_layer_they_share_once(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    base = make_layer(size=256 * KIB, seed=f"{name}-base")
    images = {tag: _image(f"{name}:{tag}", base) for tag in ("v1", "v2", "v3")}
    for tag, image in images.items():
        push_image(distribution.url, name, image, tag=tag)
    # Half a second for the shared layer: every task reaches it while the first sends it.
    hub.throttle_blob(sha256(base), 512 * KIB)
    worker = _replicator(worker_factory, hub, "shared", name)
    ctx = worker.context
    execution = worker.run(start_execution(ctx, "shared", "manual"))
    task_ids = [message["args"][0] for message in take_messages(redis_url)]
    assert len(task_ids) == 3

    async def all_at_once() -> list[Task]:
        return list(await asyncio.gather(*(run_task(ctx, one) for one in task_ids)))

    tasks = worker.run(all_at_once())

    assert [task.status for task in tasks] == [TaskStatus.SUCCEEDED] * 3
    distinct = {digest: data for image in images.values() for digest, data in image.blobs.items()}
    assert sum(task.bytes_moved for task in tasks) == sum(len(data) for data in distinct.values())
    assert len(hub.blob_gets(sha256(base))) == 1
    waited = [task for task in tasks if any("copied by another task" in line for line in task.log)]
    assert len(waited) == 2
    assert _status(worker, execution.id) is ExecutionStatus.SUCCEEDED
    destination = f"mirror/{name.split('/', 1)[1]}"
    for tag, image in images.items():
        assert tagged(worker, destination, tag) == image.digest


def _one_task(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    redis_url: str,
    rule: str,
    name: str,
) -> tuple[InProcessWorker, bytes, Image, str]:
    """`name:v1`, one 16 KiB layer, at the source, and a run of `rule` planned: its one task's
    message taken off the queue. The worker, the layer, the image and the task's id."""
    layer = make_layer(size=16 * KIB, seed=name)
    image = make_image([layer], label=name)
    push_image(distribution.url, name, image, tag="v1")
    worker = _replicator(worker_factory, hub, rule, name)
    worker.run(start_execution(worker.context, rule, "manual"))
    [message] = take_messages(redis_url)
    return worker, layer, image, message["args"][0]


def test_a_blob_gate_left_by_a_dead_task_holds_the_copy_back_only_until_its_lease_lapses(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    worker, layer, image, task_id = _one_task(worker_factory, hub, distribution, redis_url, "orphan", name)
    ctx = worker.context
    # A task took the layer's gate, then its worker died: no heartbeat renews the lease,
    # which lapses within its TTL (short here: as if the holder died most of a TTL ago).
    lapse = 1.0
    assert worker.run(
        Lease(ctx.redis, gate_key(destination_scope(True, "mirror"), sha256(layer)), ttl=lapse).acquire()
    )

    started = time.monotonic()
    task = worker.run(run_task(ctx, task_id))
    took = time.monotonic() - started

    assert task.status is TaskStatus.SUCCEEDED
    assert lapse - 0.1 < took < lapse + 1.5 < GATE_TTL_SECONDS
    assert task.bytes_moved == sum(len(data) for data in image.blobs.values())
    assert any("sender stopped or failed: sending it" in line for line in task.log)
    assert tagged(worker, f"mirror/{name.split('/', 1)[1]}", "v1") == image.digest


def test_a_task_delivered_again_takes_over_the_blob_gate_its_dead_run_left(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    worker, layer, image, task_id = _one_task(worker_factory, hub, distribution, redis_url, "again", name)
    ctx = worker.context
    # The task's first run took the layer's gate and its worker died: the lease has most of
    # its TTL left when the message comes back.
    dead = Lease(ctx.redis, gate_key(destination_scope(True, "mirror"), sha256(layer)), ttl=GATE_TTL_SECONDS)
    dead.holder = f"{task_id} {dead.holder}"
    assert worker.run(dead.acquire())

    started = time.monotonic()
    task = worker.run(run_task(ctx, task_id))

    assert time.monotonic() - started < GATE_TTL_SECONDS / 2
    assert task.status is TaskStatus.SUCCEEDED
    assert not any("waited" in line for line in task.log)
    assert tagged(worker, f"mirror/{name.split('/', 1)[1]}", "v1") == image.digest


def test_a_copy_whose_gate_and_listing_cannot_reach_redis_goes_on_without_them(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
) -> None:
    name = repo_name()
    image = _image(name)
    push_image(distribution.url, name, image, tag="v1")
    worker = _replicator(worker_factory, hub, "unreachable", name)
    ctx = worker.context
    destination_repository = f"mirror/{name.split('/', 1)[1]}"

    async def copy() -> CopyResult:
        rule = ctx.settings.rule("unreachable")
        assert rule is not None
        source, destination = await rule_endpoints(worker, rule)
        # Nothing listens there: every Redis command fails at once.
        gone = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
        try:
            return await copy_tag(
                source,
                destination,
                name,
                "v1",
                destination_repository,
                overwrite=True,
                copy_referrers=True,
                bandwidth=None,
                log=lambda line: None,
                gate=RedisBlobGate(gone, destination_scope(True, "mirror")),
                listed_tags=RedisListedTags(gone, "20261202T000000Z-000000", name),
            )
        finally:
            await gone.aclose()

    hub.reset_counters()
    result = worker.run(copy())
    assert result.bytes_moved == sum(len(data) for data in image.blobs.values())
    assert tagged(worker, destination_repository, "v1") == image.digest
    # The three tag-scheme tags were asked for with HEADs (none there), as without a listing.
    assert hub.count("HEAD", "manifest", status=404) == 3


def test_a_rerun_heads_each_tag_once_at_the_source_and_copies_a_signature_tag_added_since(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    images = {tag: _image(f"{name}:{tag}") for tag in ("v1", "v2", "v3")}
    for tag, image in images.items():
        push_image(distribution.url, name, image, tag=tag)
    worker = _replicator(worker_factory, hub, "signed", name)  # copy_referrers: true by default
    ctx = worker.context
    destination = f"mirror/{name.split('/', 1)[1]}"
    worker.run(start_execution(ctx, "signed", "manual"))
    drain(worker, redis_url)

    hub.reset_counters()
    again = worker.run(start_execution(ctx, "signed", "manual"))
    rerun = drain(worker, redis_url)
    assert [task.bytes_moved for task in rerun] == [0, 0, 0]
    assert _status(worker, again.id) is ExecutionStatus.SUCCEEDED
    # The tag's own HEAD only: the listing showed no `.sig`, `.att` or `.sbom` tag.
    assert hub.count("HEAD", "manifest") == len(images)
    assert hub.count("GET", "manifest") == 0

    # v1 is signed under the tag scheme; the image itself is unchanged.
    signature = make_image([make_layer(size=KIB, seed=f"{name}-signature")], label=f"{name}-signature")
    signature_tag = images["v1"].digest.replace(":", "-") + ".sig"
    push_image(distribution.url, name, signature, tag=signature_tag)
    hub.reset_counters()
    third = worker.run(start_execution(ctx, "signed", "manual"))
    drain(worker, redis_url)
    assert _status(worker, third.id) is ExecutionStatus.SUCCEEDED
    assert tagged(worker, destination, signature_tag) == signature.digest
    # The tags' HEADs and the signature tag's, which the listing found.
    assert hub.count("HEAD", "manifest") == len(images) + 1


def _planned(
    worker: InProcessWorker, rule: str, name: str, tags: list[str], claim_id: str
) -> tuple[str, list[Task]]:
    """An execution of `rule` started by the message `claim_id`, with a task per tag added,
    as its start leaves it just before publishing any."""
    store = execution_store(worker)
    execution = worker.run(store.start(rule, "manual", claim=claim_id))
    found = worker.context.settings.rule(rule)
    assert found is not None
    tasks = tasks_for(found, Listing({name: tags}), execution.id)
    worker.run(store.add_tasks(execution.id, tasks))
    return execution.id, tasks


def test_tasks_a_start_claimed_but_never_published_are_published_when_its_message_comes_back(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    for tag in ("v1", "v2"):
        push_image(distribution.url, name, _image(f"{name}:{tag}"), tag=tag)
    worker = _replicator(worker_factory, hub, "gap", name)
    ctx = worker.context
    execution_id, tasks = _planned(worker, "gap", name, ["v1", "v2"], "message-1")
    # The start's worker advanced the dispatched counter, then died before publishing.
    claimed, unpublished = worker.run(claim(ctx.redis, execution_id, START, TASKS_IN_FLIGHT, len(tasks)))
    assert (claimed, unpublished) == ([task.id for task in tasks], True)
    assert take_messages(redis_url) == []

    # Its message comes back: the start resumes the execution and publishes what it claimed.
    resumed = worker.run(start_execution(ctx, "gap", "manual", claim="message-1"))
    assert resumed.id == execution_id
    ran = drain(worker, redis_url)
    assert sorted(task.tag for task in ran) == ["v1", "v2"]
    assert _status(worker, execution_id) is ExecutionStatus.SUCCEEDED


def test_a_task_claimed_by_a_dead_worker_is_published_by_the_next_task_that_ends(
    worker_factory: WorkerFactory,
    hub: DockerHubEmulator,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    name = repo_name()
    tags = ["v1", "v2", "v3"]
    images = {tag: _image(f"{name}:{tag}") for tag in tags}
    for tag, image in images.items():
        push_image(distribution.url, name, image, tag=tag)
    worker = _replicator(worker_factory, hub, "lost", name)
    ctx = worker.context
    store = execution_store(worker)
    execution_id, tasks = _planned(worker, "lost", name, tags, "message-1")
    assert worker.run(dispatch(ctx, store, execution_id, START, 2)) == [tasks[0].id, tasks[1].id]
    # The first task ended, and its worker died right after claiming the next task, long
    # enough ago: its message has not come back yet.
    first = tasks[0].model_copy(
        update={"status": TaskStatus.SUCCEEDED, "attempts": 1, "finished": time.time()}
    )
    worker.run(store.update_task(first))
    dead_since = time.time() - STALE_CLAIM_SECONDS - 1
    worker.run(claim(ctx.redis, execution_id, first.id, 1, len(tasks), now=dead_since))
    messages = [message["args"][0] for message in take_messages(redis_url)]
    assert messages == [tasks[0].id, tasks[1].id]

    # The second task ends: the third is published, and the execution finishes.
    assert worker.run(run_task(ctx, tasks[1].id)).status is TaskStatus.SUCCEEDED
    [third] = drain(worker, redis_url)
    assert (third.id, third.status) == (tasks[2].id, TaskStatus.SUCCEEDED)
    assert _status(worker, execution_id) is ExecutionStatus.SUCCEEDED
    assert tagged(worker, f"mirror/{name.split('/', 1)[1]}", "v3") == images["v3"].digest
