"""The scrub re-hashes every stored blob and quarantines the ones that no longer match."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.embedded import S3Server
from shared.metrics import BLOB_CORRUPTIONS, SCRUB_BLOBS
from shared.registry.blobs import BlobStore
from shared.registry.storage import ObjectStore
from shared.scrub import scrub_once
from shared.settings import S3Settings
from tests.fixtures.edge import USERS, EdgeFactory
from tests.support.bucket import damage, objects
from tests.support.images import sha256

ALICE = ("alice", USERS["alice"])


def _push(edge_url: str, blobs: list[bytes]) -> list[str]:
    with httpx.Client(base_url=edge_url, auth=ALICE, timeout=60) as alice:
        for data in blobs:
            pushed = alice.post(
                "/v2/local/scrubbed/blobs/uploads/", params={"digest": sha256(data)}, content=data
            )
            assert pushed.status_code == 201, pushed.text
    return [sha256(data) for data in blobs]


def _config(tmp_config: Callable[..., Path], redis_url: str, s3: S3Settings, tmp_path: Path) -> Path:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "data_dir": str(tmp_path),
        "s3": {
            "endpoint": s3.endpoint,
            "access_key": s3.access_key,
            "secret_key": s3.secret_key.get_secret_value(),
            "bucket": s3.bucket,
        },
    }
    return tmp_config(values)


def test_seawall_scrub_quarantines_damaged_blobs_and_reports_them(
    edge_factory: EdgeFactory,
    s3_server: S3Server,
    s3_settings: S3Settings,
    redis_url: str,
    tmp_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    edge = edge_factory(disk_cache={"max_bytes": 0})
    blobs = [os.urandom(700_000), os.urandom(6 * 1024 * 1024), os.urandom(1000)]
    digests = _push(edge.url, blobs)
    damage(s3_server, s3_settings.bucket, digests[1])
    config = _config(tmp_config, redis_url, s3_settings, tmp_path)

    def scrub() -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "services.cli", "scrub", "--config", str(config), "--rate", "0"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)

    first = scrub()
    assert first.returncode == 2, first.stdout + first.stderr
    assert f"quarantined {digests[1]}" in first.stdout
    assert "blobs 3 " in first.stdout
    assert "sound 2" in first.stdout
    assert len(objects(s3_server, s3_settings.bucket, f"quarantine/sha256/{digests[1][7:]}/")) == 1
    with httpx.Client(base_url=edge_factory(disk_cache={"max_bytes": 0}).url, timeout=60) as client:
        assert client.get(f"/v2/local/scrubbed/blobs/{digests[1]}").status_code == 404
        for digest, data in ((digests[0], blobs[0]), (digests[2], blobs[2])):
            assert client.get(f"/v2/local/scrubbed/blobs/{digest}").content == data
    # Nothing left to find.
    second = scrub()
    assert second.returncode == 0, second.stdout + second.stderr
    assert "quarantined 0" in second.stdout


def test_the_scheduled_scrub_runs_once_at_a_time_and_counts_what_it_finds(
    edge_factory: EdgeFactory, s3_server: S3Server, s3_settings: S3Settings, redis_url: str
) -> None:
    edge = edge_factory(disk_cache={"max_bytes": 0})
    digests = _push(edge.url, [os.urandom(300_000), os.urandom(200_000)])
    damage(s3_server, s3_settings.bucket, digests[0])
    corrupt_before = SCRUB_BLOBS.labels("corrupt")._value.get()
    quarantined_before = BLOB_CORRUPTIONS.labels("scrub")._value.get()

    async def two_at_once() -> list[Any]:
        store = ObjectStore(s3_settings)
        redis = Redis.from_url(redis_url)
        try:
            blobs = BlobStore(store)
            runs = [scrub_once(redis, store, blobs, bytes_per_second=1024 * 1024) for _ in range(2)]
            return list(await asyncio.gather(*runs))
        finally:
            await redis.aclose()
            store.close()

    reports = asyncio.run(two_at_once())
    done = [r for r in reports if r is not None]
    assert len(done) == 1, "a second scrub must not start while one runs"
    assert done[0].corrupt == [digests[0]]
    assert done[0].ok == 1
    assert SCRUB_BLOBS.labels("corrupt")._value.get() == corrupt_before + 1
    assert BLOB_CORRUPTIONS.labels("scrub")._value.get() == quarantined_before + 1


def test_the_scheduler_fires_the_scrub_on_its_schedule_unless_it_is_off() -> None:
    from datetime import UTC, datetime

    from pydantic import ValidationError

    from services.scheduler.schedule import maintenance
    from shared.settings import Settings

    [scrub_trigger] = [
        t for t in maintenance(Settings(scrub={"schedule": "0 2 * * *"})) if t.name == "scrub-blobs"
    ]
    assert scrub_trigger.actor == "scrub_blobs_job"
    assert scrub_trigger.due_between(
        datetime(2026, 1, 1, 1, 59, tzinfo=UTC), datetime(2026, 1, 1, 2, 0, tzinfo=UTC)
    )
    assert not scrub_trigger.due_between(
        datetime(2026, 1, 1, 2, 1, tzinfo=UTC), datetime(2026, 1, 1, 3, 0, tzinfo=UTC)
    )
    assert "scrub-blobs" not in {t.name for t in maintenance(Settings(scrub={"schedule": None}))}
    with pytest.raises(ValidationError, match=r"scrub\.schedule"):
        Settings(scrub={"schedule": "every night"})
