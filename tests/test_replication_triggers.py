"""What starts replication runs: the scheduler fires cron rules (one leader among several
schedulers), and a push to a hosted project through a real edge fires its on-push rules,
whose run, taken from the real queue by an in-process worker, puts the tag at the
destination (a Distribution)."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import redis

from services.scheduler.__main__ import run
from services.scheduler.schedule import replication
from shared import jobs
from shared.replication.records import ExecutionStatus
from shared.settings import Settings
from tests.fixtures.edge import PROJECTS, USERS, EdgeFactory
from tests.fixtures.servers import WorkerFactory
from tests.support.distribution import Distribution
from tests.support.images import OCI_MANIFEST, make_image, make_layer
from tests.support.replication import KIB, execution_store, read_execution
from tests.support.seed import push_image
from workers.broker import WakeableRedisBroker, connection_pool
from workers.replication import run_task, start_execution


def _replication_messages(client: redis.Redis) -> list[dict[str, Any]]:
    raw = client.hvals(f"{jobs.NAMESPACE}:{jobs.REPLICATION_QUEUE}.msgs")
    return sorted((json.loads(m) for m in raw), key=lambda m: m["message_timestamp"])


def test_two_schedulers_fire_a_cron_rule_once_per_firing(redis_url: str) -> None:
    settings = Settings.model_validate(
        {
            "redis_url": redis_url,
            "upstreams": [{"name": "up", "url": "http://127.0.0.1:9"}],
            "projects": [{"name": "mirror", "type": "hosted"}],
            "replication": [
                {
                    "name": "every-second",
                    "mode": "pull",
                    "source": "up",
                    "filters": {"name": "library/python"},
                    "destination": "mirror",
                    "trigger": {"type": "cron", "schedule": "* * * * * *"},
                },
                {
                    "name": "off",
                    "mode": "pull",
                    "source": "up",
                    "destination": "mirror",
                    "trigger": {"type": "cron", "schedule": "* * * * * *"},
                    "enabled": False,
                },
            ],
        }
    )
    triggers = replication(settings)
    assert [t.name for t in triggers] == ["replicate-every-second"]
    loops: list[asyncio.AbstractEventLoop] = []
    stops: list[asyncio.Event] = []
    brokers = []
    threads = []
    for _ in range(2):
        broker = WakeableRedisBroker(
            namespace=jobs.NAMESPACE, connection_pool=connection_pool(redis_url, 2.0)
        )  # type: ignore[no-untyped-call]
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()  # each scheduler's own: an Event belongs to one loop
        loops.append(loop)
        stops.append(stop)
        brokers.append(broker)
        scheduler = run(settings, stop, broker, triggers, tick=0.2)
        threads.append(threading.Thread(target=loop.run_until_complete, args=(scheduler,)))
    client = redis.Redis.from_url(redis_url)
    started = time.time()
    for thread in threads:
        thread.start()
    try:
        time.sleep(3.2)
    finally:
        for loop, stop in zip(loops, stops, strict=True):
            loop.call_soon_threadsafe(stop.set)
        for thread in threads:
            thread.join(15)
        for loop in loops:
            loop.close()
        for broker in brokers:
            broker.close()
    elapsed = time.time() - started
    messages = _replication_messages(client)
    client.close()
    assert {(m["actor_name"], tuple(m["args"])) for m in messages} == {
        (jobs.REPLICATE.actor, ("every-second", "cron", None, None))
    }
    # One firing a second, by whichever scheduler leads: never two for one second.
    assert 2 <= len(messages) <= elapsed + 1
    made = [m["message_timestamp"] / 1000 for m in messages]
    assert all(later - earlier > 0.5 for earlier, later in itertools.pairwise(made))


def test_a_push_to_a_hosted_project_runs_its_on_push_rule_for_that_tag(
    edge_factory: EdgeFactory,
    worker_factory: WorkerFactory,
    distribution: Distribution,
    repo_name: Callable[[], str],
    redis_url: str,
) -> None:
    namespace = repo_name()  # unique at the session's Distribution
    apps = {"name": "apps", "type": "hosted", "public": True}
    ends: dict[str, Any] = {
        "upstreams": [{"name": "dist", "url": distribution.url, "flavor": "registry"}],
        "replication": [
            {
                "name": "to-site",
                "mode": "push",
                "source": "apps",
                "filters": {"name": "apps/**", "tag": "v*"},
                "destination": "dist",
                "destination_namespace": namespace,
                "trigger": {"type": "on_push"},
            }
        ],
    }
    edge = edge_factory(projects=[*PROJECTS, {**apps, "push": ["alice"]}], **ends)
    worker = worker_factory(projects=[apps], **ends)
    image = make_image([make_layer(size=8 * KIB, seed=namespace)], label=namespace)
    client = redis.Redis.from_url(redis_url)
    try:
        push_image(edge.url, "apps/web", image, tag="dev", auth=("alice", USERS["alice"]))
        # `dev` does not match the rule's tag filter: nothing is published.
        assert _replication_messages(client) == []
        push_image(edge.url, "apps/web", image, tag="v1", auth=("alice", USERS["alice"]))
        [message] = _replication_messages(client)
        client.delete(f"{jobs.NAMESPACE}:{jobs.REPLICATION_QUEUE}.msgs")
    finally:
        client.close()
    assert (message["actor_name"], message["args"]) == (
        jobs.REPLICATE.actor,
        ["to-site", "on_push", "apps/web", "v1"],
    )

    # A worker takes it: an execution of that one tag, whose task puts it at the destination.
    execution = worker.run(start_execution(worker.context, *message["args"]))
    assert (execution.trigger, execution.total) == ("on_push", 1)
    [task] = worker.run(execution_store(worker).tasks(execution.id))
    assert (task.source_repository, task.tag, task.destination_repository) == (
        "apps/web",
        "v1",
        f"{namespace}/web",
    )
    assert worker.run(run_task(worker.context, task.id)).status.value == "succeeded"
    done = read_execution(worker, execution.id)
    assert done.status is ExecutionStatus.SUCCEEDED
    with httpx.Client(base_url=distribution.url, timeout=30) as upstream:
        pushed = upstream.get(f"/v2/{namespace}/web/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert pushed.status_code == 200
        assert pushed.content == image.manifest
        assert upstream.get(f"/v2/{namespace}/web/manifests/dev").status_code == 404
