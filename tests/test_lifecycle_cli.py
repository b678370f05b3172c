"""Running the storage lifecycle: `seawall gc / evict / retention`, the scheduler's triggers,
and the workers' scheduled runs (busy and failed runs come back later)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from redis.asyncio import Redis

from services.cli import main as seawall
from services.embedded import S3Server
from services.lifecycle_cli import cache_bytes, run_command
from services.scheduler.schedule import maintenance
from shared import jobs
from shared.leases import Lease
from shared.lifecycle.inventory import Image, RepositoryView
from shared.lifecycle.runs import LIFECYCLE_LEASE
from shared.metrics import LIFECYCLE_RUNS
from shared.oci.digest import Digest
from shared.settings import S3Settings, Settings, load_settings
from tests.fixtures.edge import USERS, EdgeFactory
from tests.fixtures.servers import WorkerFactory
from tests.support.bucket import objects
from tests.support.images import make_image, make_layer, sha256
from tests.support.seed import push_image
from workers.lifecycle import RETRIES, RETRY_SECONDS, run_scheduled

HUB = {"name": "hub", "type": "proxy", "upstreams": ["dockerhub"], "cache": {"max_bytes": "1GiB"}}
PLAIN_HUB = {"name": "mirror", "type": "proxy", "upstreams": ["dockerhub"]}
TEAM = {"name": "team", "retention": [{"repositories": "**", "tags": "v*", "keep_most_recent": 3}]}
PLAIN = {"name": "local", "type": "hosted", "public": True}
UPSTREAMS = [{"name": "dockerhub", "url": "https://registry-1.docker.io", "flavor": "dockerhub"}]


def _config(
    tmp_config: Callable[..., Path], redis_url: str, s3: S3Settings, tmp_path: Path, **more: Any
) -> Path:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "data_dir": str(tmp_path),
        "s3": {
            "endpoint": s3.endpoint,
            "access_key": s3.access_key,
            "secret_key": s3.secret_key.get_secret_value(),
            "bucket": s3.bucket,
        },
        "projects": [PLAIN, TEAM, HUB, PLAIN_HUB],
        "upstreams": UPSTREAMS,
        **more,
    }
    return tmp_config(values)


def _seawall(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "services.cli", *args, "--config", str(config)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evict", "nosuch"], "no project named 'nosuch' (projects: local, team, hub, mirror)"),
        (["evict", "team"], "project 'team' is hosted: eviction applies to proxy projects"),
        (["evict", "mirror"], "project 'mirror' has no cache policy"),
        (["retention", "hub"], "project 'hub' is proxy: retention applies to hosted projects"),
        (["retention", "local"], "project 'local' has no retention rules"),
        (["retention", "--dry-run", "nosuch"], "no project named 'nosuch'"),
    ],
)
def test_evict_and_retention_refuse_a_project_that_cannot_have_the_job(
    tmp_config: Callable[..., Path], args: list[str], message: str
) -> None:
    # No Redis or bucket is configured: the project is checked before either is reached.
    config = tmp_config({"projects": [PLAIN, TEAM, HUB, PLAIN_HUB], "upstreams": UPSTREAMS})
    result = CliRunner().invoke(seawall, [*args, "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Invalid value for 'PROJECT'" in result.output


def test_evict_and_retention_need_a_project() -> None:
    for command in ("evict", "retention"):
        result = CliRunner().invoke(seawall, [command])
        assert result.exit_code == 2
        assert "Missing argument 'PROJECT'" in result.output
    result = CliRunner().invoke(seawall, ["gc", "extra"])
    assert result.exit_code == 2


def test_a_command_run_while_another_lifecycle_job_runs_says_so_and_exits_3(
    redis_url: str, s3_settings: S3Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(redis_url=redis_url, s3=s3_settings)

    async def busy() -> int:
        redis = Redis.from_url(redis_url)
        try:
            assert await Lease(redis, LIFECYCLE_LEASE, ttl=60).acquire()
            return await run_command(settings, redis_url, "gc", None, dry_run=True)
        finally:
            await redis.aclose()

    assert asyncio.run(busy()) == 3
    assert "gc: another lifecycle job (gc, eviction or retention) is running; gc not started" in (
        capsys.readouterr().out.splitlines()
    )


def test_seawall_gc_lists_what_a_dry_run_would_delete_then_deletes_it(
    edge_factory: EdgeFactory,
    s3_server: S3Server,
    s3_settings: S3Settings,
    redis_url: str,
    tmp_config: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    edge = edge_factory(disk_cache={"max_bytes": 0})
    # A blob pushed without a manifest: nothing references it.
    orphan = os.urandom(50_000)
    digest = sha256(orphan)
    with httpx.Client(base_url=edge.url, auth=("alice", USERS["alice"]), timeout=60) as alice:
        pushed = alice.post("/v2/local/orphaned/blobs/uploads/", params={"digest": digest}, content=orphan)
        assert pushed.status_code == 201, pushed.text
    blob_key = f"blobs/sha256/{digest[7:9]}/{digest[7:]}"
    assert objects(s3_server, s3_settings.bucket, blob_key) == [blob_key]
    # No grace period: the blob is old enough at once.
    config = _config(tmp_config, redis_url, s3_settings, tmp_path, lifecycle={"gc_grace": "0s"})

    # The dry run in-process (run_command, as `seawall gc --dry-run` runs it)...
    assert asyncio.run(run_command(load_settings(config), redis_url, "gc", None, dry_run=True)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("gc (dry run): succeeded in ") for line in lines), lines
    assert any(line.startswith("examined  ") for line in lines), lines
    assert any(line.startswith("would delete ") and "blob 1 (48.8 KiB)" in line for line in lines), lines
    assert f"would delete blob {digest}" in lines
    assert objects(s3_server, s3_settings.bucket, blob_key) == [blob_key], "a dry run deletes nothing"

    # ... the real one through the command.
    real = _seawall(config, "gc")
    assert real.returncode == 0, real.stdout + real.stderr
    lines = real.stdout.splitlines()
    assert lines[0].startswith("gc: succeeded in "), lines
    assert any(line.startswith("deleted ") and "blob 1 (48.8 KiB)" in line for line in lines), lines
    assert not any(line.startswith("would delete") for line in lines)
    assert objects(s3_server, s3_settings.bucket, blob_key) == []


def test_the_scheduler_fires_the_lifecycle_jobs_on_their_schedules() -> None:
    settings = Settings(projects=[PLAIN, TEAM, HUB, PLAIN_HUB], upstreams=UPSTREAMS)
    fired = {t.name: t for t in maintenance(settings)}
    assert fired["gc"].job == jobs.COLLECT_GARBAGE
    assert fired["gc"].args == (0,)
    assert fired["gc"].cron == "0 4 * * *"
    # Eviction for each proxy project with a cache policy, retention for each hosted one with rules.
    assert fired["evict-hub"].job == jobs.EVICT_CACHE
    assert fired["evict-hub"].args == ("hub", 0)
    assert fired["retention-team"].job == jobs.APPLY_RETENTION
    assert fired["retention-team"].args == ("team", 0)
    assert {"evict-mirror", "retention-local", "evict-team", "retention-hub"}.isdisjoint(fired)
    assert fired["evict-hub"].due_between(
        datetime(2026, 1, 1, 4, 9, tzinfo=UTC), datetime(2026, 1, 1, 4, 10, tzinfo=UTC)
    )
    assert not fired["retention-team"].due_between(
        datetime(2026, 1, 1, 4, 31, tzinfo=UTC), datetime(2026, 1, 1, 5, 0, tzinfo=UTC)
    )

    schedules = {"gc_schedule": "15 3 * * 0", "eviction_schedule": None, "retention_schedule": None}
    settings = Settings(projects=[PLAIN, TEAM, HUB], upstreams=UPSTREAMS, lifecycle=schedules)
    lifecycle = [t for t in maintenance(settings) if t.job.actor in _LIFECYCLE_ACTORS]
    assert [(t.name, t.cron) for t in lifecycle] == [("gc", "15 3 * * 0")]
    with pytest.raises(ValidationError, match=r"lifecycle\.gc_schedule"):
        Settings(lifecycle={"gc_schedule": "nightly"})


_LIFECYCLE_ACTORS = {jobs.COLLECT_GARBAGE.actor, jobs.EVICT_CACHE.actor, jobs.APPLY_RETENTION.actor}


def test_a_scheduled_run_that_finds_another_running_comes_back_later(
    worker_factory: WorkerFactory, redis_url: str
) -> None:
    worker = worker_factory(projects=[PLAIN, TEAM])
    busy_before = LIFECYCLE_RUNS.labels("retention", "busy")._value.get()

    async def hold() -> None:
        assert await Lease(worker.context.redis, LIFECYCLE_LEASE, ttl=60).acquire()

    worker.run(hold())
    ctx = worker.context
    assert worker.run(run_scheduled(ctx, "retention", "team", 0)) == RETRY_SECONDS
    assert worker.run(run_scheduled(ctx, "retention", "team", 2)) == 4 * RETRY_SECONDS
    # Tried often enough: the next schedule runs it.
    assert worker.run(run_scheduled(ctx, "retention", "team", RETRIES["retention"])) is None
    assert LIFECYCLE_RUNS.labels("retention", "busy")._value.get() == busy_before + 3
    # A project that lost its rules since the message was published: skipped, not retried.
    assert worker.run(run_scheduled(ctx, "retention", "local", 0)) is None
    assert LIFECYCLE_RUNS.labels("retention", "busy")._value.get() == busy_before + 3


def test_seawall_stats_shows_a_hosted_projects_usage_against_its_quota(
    edge_factory: EdgeFactory,
    s3_settings: S3Settings,
    redis_url: str,
    tmp_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    pushers = {"push": ["alice"], "delete": ["alice"]}
    edge = edge_factory(projects=[{**PLAIN, **pushers, "quota": "4MiB"}])
    image = make_image([make_layer(size=1024 * 1024, seed="stats")])
    push_image(edge.url, "local/app", image, auth=("alice", USERS["alice"]))
    used = len(image.manifest) + sum(len(blob) for blob in image.blobs.values())
    config = _config(
        tmp_config, redis_url, s3_settings, tmp_path, projects=[{**PLAIN, "quota": "4MiB"}, TEAM, HUB]
    )

    def stats() -> dict[str, list[str]]:
        result = CliRunner().invoke(seawall, ["stats", "--config", str(config)])
        assert result.exit_code == 0, result.output
        rows = [line.replace("│", " ").split() for line in result.output.splitlines()]
        return {row[0]: row[1:] for row in rows if row and row[0] in {"local", "team", "hub"}}

    shown = stats()
    assert shown["local"][:5] == ["hosted", *size_words(used), "4.0", "MiB"]
    assert shown["local"][5] == f"{used / (4 * 1024 * 1024):.0%}"
    assert shown["team"] == ["hosted", "0", "B", "-", "-", "1", "retention", "rules"]
    assert shown["hub"] == ["proxy", "0", "B", "1.0", "GiB", "0%"]

    # Redis lost the ledger: the usage is read from the bucket again.
    async def flush() -> None:
        redis = Redis.from_url(redis_url)
        await redis.flushdb()
        await redis.aclose()

    asyncio.run(flush())
    assert stats()["local"][:3] == ["hosted", *size_words(used)]


def size_words(count: int) -> list[str]:
    return [f"{count / 1024 / 1024:.1f}", "MiB"]


def _digest(char: str) -> Digest:
    return Digest.parse("sha256:" + char * 64)


def test_a_proxy_projects_cache_counts_its_images_and_lone_linked_blobs_once() -> None:
    config, layer, shared, lone = (_digest(c) for c in "abcd")
    first = Image("hub/a", _digest("1"), "m", 500, 0.0, ("1",), (config, layer), (), None)
    second = Image("hub/b", _digest("2"), "m", 400, 0.0, (), (config, shared), (), None)
    views = [
        RepositoryView(
            "hub/a",
            links={config: (10, 0.0), layer: (1000, 0.0), lone: (7, 0.0)},
            images={first.digest: first},
        ),
        RepositoryView(
            "hub/b", links={config: (10, 0.0), shared: (300, 0.0)}, images={second.digest: second}
        ),
    ]
    # Manifests 500 + 400, config 10 once, layers 1000 + 300, and the blob linked alone 7.
    assert cache_bytes(views) == 500 + 400 + 10 + 1000 + 300 + 7
