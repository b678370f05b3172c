"""Replication test helpers: settings fragments (the emulator as an upstream, a pull rule),
small images pushed to an upstream, the replication queue taken and run in-process as
workers would, and reads of what a run left (its records, the destination's tags and blobs)."""

from __future__ import annotations

import json
from typing import Any

import redis

from shared import jobs
from shared.oci.digest import Digest
from shared.replication.endpoints import Destination, Source, endpoints_for
from shared.replication.records import Execution, Task
from shared.replication.rules import ReplicationRule
from shared.replication.store import ExecutionStore
from tests.fixtures.proxy import CacheStack
from tests.fixtures.servers import InProcessWorker, WorkerFactory
from tests.support.dockerhub import DockerHubEmulator
from tests.support.images import Image, make_image, make_layer
from tests.support.seed import push_image
from workers.replication import run_task, start_execution

KIB = 1024
# The timeouts of the tests' upstreams: one that does not answer fails a test in seconds.
TIMEOUTS = {"head_timeout": "2s", "read_timeout": "10s", "connect_timeout": "2s"}


# Settings


def hub_upstream(hub: DockerHubEmulator, **extra: Any) -> dict[str, Any]:
    """The emulator as the upstream `hub` (Docker Hub's flavour)."""
    return {"name": "hub", "url": hub.url, "flavor": "dockerhub", **TIMEOUTS, **extra}


def pull_rule(name: str, repository: str, destination: str = "mirror", **extra: Any) -> dict[str, Any]:
    """A manual pull rule from `hub` into the hosted project `destination` (flatten 1)."""
    return {
        "name": name,
        "mode": "pull",
        "source": "hub",
        "filters": {"name": repository},
        "destination": destination,
        **extra,
    }


def pull_replicator(
    worker_factory: WorkerFactory, hub: DockerHubEmulator, rules: list[dict[str, Any]], **upstream: Any
) -> InProcessWorker:
    """An in-process worker with `rules`, the emulator as `hub` and the hosted project `mirror`."""
    return worker_factory(
        upstreams=[hub_upstream(hub, **upstream)],
        projects=[{"name": "mirror", "type": "hosted"}],
        replication=rules,
    )


# Images at the source


def small_image(label: str, size: int = 4 * KIB) -> Image:
    """An image of one layer of `size` bytes, its bytes and config seeded by `label`."""
    return make_image([make_layer(size=size, seed=label)], label=label)


def push_small_images(url: str, name: str, tags: list[str], size: int = 4 * KIB) -> dict[str, Image]:
    """A small image per tag (labelled `name:tag`) pushed to repository `name` at `url`."""
    images = {tag: small_image(f"{name}:{tag}", size) for tag in tags}
    for tag, image in images.items():
        push_image(url, name, image, tag=tag)
    return images


def flattened(project: str, name: str) -> str:
    """Where a rule with flatten 1 puts repository `name` in `project`."""
    return f"{project}/{name.split('/', 1)[1]}"


# The queue, run in-process


def publish_start(redis_url: str, rule: str) -> None:
    """A REPLICATE message, as the CLI, the scheduler or the edge publish it."""
    broker = jobs.make_broker(redis_url)
    try:
        jobs.enqueue(broker, jobs.REPLICATE, (rule, "manual", None, None))
    finally:
        broker.close()


def take_messages(redis_url: str) -> list[dict[str, Any]]:
    """The replication messages queued now, taken off the queue (as a worker would), oldest first."""
    client = redis.Redis.from_url(redis_url)
    try:
        queue = f"{jobs.NAMESPACE}:{jobs.REPLICATION_QUEUE}"
        with client.pipeline() as pipe:
            pipe.hvals(f"{queue}.msgs")
            pipe.delete(f"{queue}.msgs", queue)
            raw, _ = pipe.execute()
        return sorted((json.loads(message) for message in raw), key=lambda m: m["message_timestamp"])
    finally:
        client.close()


def drain(worker: InProcessWorker, redis_url: str) -> list[Task]:
    """Run every queued replication job until none is queued; the tasks' states after each
    run. A task left waiting or backing off is not run again (its message would come back later)."""
    ran = []
    while messages := take_messages(redis_url):
        for message in messages:
            if message["actor_name"] == jobs.REPLICATE.actor:
                worker.run(start_execution(worker.context, *message["args"]))
            else:
                assert message["actor_name"] == jobs.REPLICATE_TASK.actor
                ran.append(worker.run(run_task(worker.context, *message["args"])))
    return ran


def run_execution(worker: InProcessWorker, redis_url: str, rule: str) -> Execution:
    """A manual run of `rule` and every job it queues, run to the end; the execution then."""
    started = worker.run(start_execution(worker.context, rule, "manual"))
    drain(worker, redis_url)
    return read_execution(worker, started.id)


async def rule_endpoints(worker: InProcessWorker, rule: ReplicationRule) -> tuple[Source, Destination]:
    """The source and destination of `rule`, built on the worker's stores as its tasks build them."""
    ctx = worker.context
    return await endpoints_for(
        rule,
        ctx.settings,
        blobs=ctx.blobs,
        repositories=ctx.repositories,
        objects=ctx.objects,
        upstreams=ctx.upstreams,
    )


# Reading what a run left


def execution_store(worker: InProcessWorker) -> ExecutionStore:
    return ExecutionStore(worker.context.redis, worker.context.objects)


def read_execution(worker: InProcessWorker, execution_id: str) -> Execution:
    found = worker.run(execution_store(worker).execution(execution_id))
    assert found is not None
    return found


def read_executions(worker: InProcessWorker, rule: str) -> list[Execution]:
    return worker.run(execution_store(worker).executions(rule))


def stack_reader(worker_factory: WorkerFactory, stack: CacheStack) -> InProcessWorker:
    """The test's own view of a stack's Redis and bucket (no upstreams: it only reads)."""
    return worker_factory(projects=[{"name": "local", "type": "hosted"}], data_dir=stack.work_dir / "reader")


def tagged(worker: InProcessWorker, name: str, tag: str) -> str | None:
    """The digest tag `tag` of repository `name` points at, if any."""
    digest = worker.run(worker.context.repositories.resolve_tag(name, tag))
    return str(digest) if digest else None


def stored(worker: InProcessWorker, name: str, digest: str) -> bytes | None:
    """The blob as repository `name` of this Seawall serves it, if it is linked there."""
    ctx = worker.context

    async def read() -> bytes | None:
        parsed = Digest.parse(digest)
        if not await ctx.repositories.blob_linked(name, parsed):
            return None
        return b"".join([chunk async for chunk in ctx.blobs.stream(parsed)])

    return worker.run(read())
