"""A garbage collection killed at any point breaks no pull, and the next run finishes its work:
the bucket then holds exactly what one uninterrupted run leaves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.embedded import S3Server
from shared.lifecycle.gc_sweep import KILL_ENV, KILL_POINTS
from shared.lifecycle.runs import LIFECYCLE_LEASE
from shared.oci.digest import Digest
from shared.registry import layout
from shared.settings import S3Settings, Settings, load_settings
from tests.fixtures.edge import EdgeFactory, EdgeServer
from tests.support.bucket import objects, read, write
from tests.support.images import Image, make_image, make_layer, sha256
from tests.test_gc import (
    ALICE,
    GC_PROJECTS,
    delete_manifest,
    gc,
    past_grace,
    pulls_back,
    push_image,
    run,
)


@dataclass
class Scenario:
    """What was pushed, and which keys one whole collection deletes."""

    images: dict[str, tuple[str, str, Image]] = field(default_factory=dict)  # name -> repo, ref, image
    doomed: set[str] = field(default_factory=set)


def _digest(text: str) -> Digest:
    return Digest.parse(text)


def _blob_keys(s3_server: S3Server, bucket: str, digest: str) -> set[str]:
    """A blob's record and the objects holding its bytes."""
    record = json.loads(read(s3_server, bucket, layout.blob(_digest(digest))))
    return {layout.blob(_digest(digest)), *(key for key, _ in record["extents"])}


def build(url: str, s3_server: S3Server, bucket: str) -> Scenario:
    """Two images kept, one deleted (sharing a layer with a kept one), two untagged manifests
    in a project that deletes them, an expired upload and orphans of crashed writers."""
    scenario = Scenario()
    shared = make_layer(size=4000, seed="shared")
    kept = make_image([shared, make_layer(size=3000, seed="kept")], label="kept")
    dropped = make_image([shared, make_layer(size=3000, seed="dropped")], label="dropped")
    tagged = make_image(label="tagged")
    untagged = [make_image([make_layer(size=2000, seed=f"u{i}")], label=f"u{i}") for i in range(2)]
    push_image(url, "local/kept", kept, tag="v1", auth=ALICE)
    push_image(url, "local/dropped", dropped, tag="v1", auth=ALICE)
    push_image(url, "tidy/app", tagged, tag="v1", auth=ALICE)
    for image in untagged:
        push_image(url, "tidy/app", image, tag=None, auth=ALICE)
    delete_manifest(url, "local/dropped", dropped.digest)
    scenario.images = {
        "kept": ("local/kept", "v1", kept),
        "tagged": ("tidy/app", "v1", tagged),
        **{f"untagged{i}": ("tidy/app", image.digest, image) for i, image in enumerate(untagged)},
    }

    gone = [dropped.digest, sha256(dropped.config), sha256(dropped.layers[1])]
    for digest in gone:
        scenario.doomed |= _blob_keys(s3_server, bucket, digest)
        if digest != dropped.digest:
            scenario.doomed.add(layout.project_blob("local", _digest(digest)))
    scenario.doomed |= set(objects(s3_server, bucket, "repositories/local/dropped/_layers/"))
    for image in untagged:
        scenario.doomed |= _blob_keys(s3_server, bucket, image.digest)
        scenario.doomed.add(layout.revision("tidy/app", _digest(image.digest)))
        for digest in image.blobs:
            scenario.doomed |= _blob_keys(s3_server, bucket, digest)
            scenario.doomed.add(layout.layer_link("tidy/app", _digest(digest)))
            scenario.doomed.add(layout.project_blob("tidy", _digest(digest)))

    parts = set(objects(s3_server, bucket, "extents/"))
    with httpx.Client(base_url=url, auth=ALICE, timeout=60) as client:
        started = client.post("/v2/local/abandoned/blobs/uploads/")
        assert client.patch(started.headers["Location"], content=b"x" * 500).status_code == 202
    scenario.doomed |= set(objects(s3_server, bucket, "uploads/"))
    scenario.doomed |= set(objects(s3_server, bucket, "extents/")) - parts
    for key in (
        f"blobdata/sha256/{'ab' * 32}/00000000000000aa",
        "extents/0123456789abcdef0123456789abcdef/0000000000000000.00000000000000aa",
        layout.fill_segment(_digest(sha256(b"a fill that failed")), 0),
    ):
        write(s3_server, bucket, key, b"left behind by a crashed writer")
        scenario.doomed.add(key)
    return scenario


def every_image_still_pulls(url: str, scenario: Scenario, s3_server: S3Server, bucket: str) -> None:
    """The kept images pull, and so does each untagged one whose revision is still there."""
    present = set(objects(s3_server, bucket, "repositories/"))
    for repo, reference, image in scenario.images.values():
        if layout.revision(repo, _digest(image.digest)) in present:
            pulls_back(url, repo, reference, image)


def nothing_half_deleted(s3_server: S3Server, bucket: str) -> None:
    """Every blob record still there names only objects that are there too."""
    present = set(objects(s3_server, bucket, ""))
    for key in sorted(k for k in present if k.startswith(layout.BLOBS)):
        record = json.loads(read(s3_server, bucket, key))
        missing = [extent for extent, _ in record["extents"] if extent not in present]
        assert not missing, (key, missing)


def _config(tmp_config: Callable[..., Path], settings: Settings, tmp_path: Path) -> Path:
    s3 = settings.s3
    assert s3 is not None
    projects = [p for p in GC_PROJECTS if p["name"] != "mirror"]
    return tmp_config(
        {
            "redis_url": settings.redis_url,
            "data_dir": str(tmp_path),
            "s3": {
                "endpoint": s3.endpoint,
                "access_key": s3.access_key,
                "secret_key": s3.secret_key.get_secret_value(),
                "bucket": s3.bucket,
            },
            "users": [
                {"name": u.name, "password_hash": u.password_hash.get_secret_value()} for u in settings.users
            ],
            "projects": projects,
            "lifecycle": {"gc_grace": "1s"},
            "upload_expiry": "1s",
            "log_level": "warning",
        }
    )


async def _lapse_lease(redis_url: str) -> None:
    """The killed run's lifecycle lease would lapse by its TTL; the test does not wait."""
    redis = Redis.from_url(redis_url)
    await redis.delete(LIFECYCLE_LEASE)
    await redis.aclose()


@pytest.mark.parametrize("point", KILL_POINTS)
def test_gc_killed_at_any_point_breaks_no_pull_and_the_next_run_finishes(
    point: str,
    edge_factory: EdgeFactory,
    s3_server: S3Server,
    s3_settings: S3Settings,
    redis_url: str,
    tmp_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    edge: EdgeServer = edge_factory(disk_cache={"max_bytes": 0}, projects=GC_PROJECTS)
    bucket = s3_settings.bucket
    scenario = build(edge.url, s3_server, bucket)
    before = set(objects(s3_server, bucket, ""))
    assert scenario.doomed <= before
    past_grace()
    config = _config(tmp_config, edge.settings, tmp_path)
    env: dict[str, Any] = {**os.environ, KILL_ENV: point}

    killed = subprocess.run(
        [sys.executable, "-m", "services.cli", "gc", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    nothing_half_deleted(s3_server, bucket)
    every_image_still_pulls(edge.url, scenario, s3_server, bucket)
    run(_lapse_lease(redis_url))
    settings = load_settings(config)
    finished = gc(settings)
    assert finished.outcome == "succeeded"
    assert set(objects(s3_server, bucket, "")) == before - scenario.doomed
    every_image_still_pulls(edge.url, scenario, s3_server, bucket)
    assert gc(settings).deleted_objects == 0
