"""Tag retention: the issue's three rules together on a hosted project, a dry run then a real run."""

from __future__ import annotations

import time
from typing import Any

import redis

from shared.lifecycle.pulls import pulls_key, since_key, snapshot_key, tag_member
from shared.lifecycle.retention import apply_retention
from shared.lifecycle.runs import LifecycleDeps
from shared.oci.digest import Digest
from shared.oci.manifest import parse_manifest
from shared.registry import layout
from tests.fixtures.edge import PROJECTS
from tests.fixtures.servers import InProcessWorker, WorkerFactory
from tests.support.images import OCI_MANIFEST, Image, make_image

DAY = 86_400.0
RULES: list[dict[str, Any]] = [
    {"repositories": "**", "tags": "v*", "keep_most_recent": 2},
    {"repositories": "ci/**", "tags": "**", "keep_pulled_within": "14d"},
    {"repositories": "**", "tags": ["latest", "stable"], "keep": "always"},
]


def _projects() -> list[dict[str, Any]]:
    return [{**p, "retention": RULES} if p["name"] == "local" else p for p in PROJECTS]


async def _store(deps: LifecycleDeps, repository: str, image: Image, tag: str) -> None:
    """Store an image and tag it as a push does (blobs, links, manifest, revision, tag)."""
    for digest, data in image.blobs.items():
        await deps.blobs.commit_bytes(Digest.parse(digest), data)
        await deps.repositories.link_blob(repository, Digest.parse(digest), len(data))
    digest = Digest.parse(image.digest)
    await deps.blobs.commit_bytes(digest, image.manifest)
    await deps.repositories.add_revision(repository, digest, parse_manifest(image.manifest, OCI_MANIFEST))
    await deps.repositories.set_tag(repository, tag, digest)


def _tagged(worker: InProcessWorker, item: str) -> bool:
    """Whether the tag `<repository>:<tag>` is in the bucket."""
    repository, tag = item.split(":")
    return worker.run(worker.context.objects.stat(layout.tag(repository, tag))) is not None


def test_retention_deletes_exactly_the_tags_no_rule_keeps_after_a_dry_run_that_lists_them(
    worker_factory: WorkerFactory, redis_url: str, user_hashes: dict[str, str]
) -> None:
    users = [{"name": n, "password_hash": h} for n, h in user_hashes.items()]
    worker = worker_factory(projects=_projects(), users=users)
    deps = worker.context.lifecycle
    a, b, c, d, e = (make_image(label=f"retention-{n}") for n in "abcde")
    # The first generation of pushes...
    for repository, image, tag in [
        ("local/app", a, "v1"),
        ("local/app", b, "v2"),
        ("local/app", b, "feature-x"),
        ("local/app", a, "latest"),
        ("local/ci/build", c, "pr-1"),
        ("local/ci/build", d, "pr-2"),
        ("local/ci/build", c, "v1"),
    ]:
        worker.run(_store(deps, repository, image, tag))
    # ...and a later one (the store's push times have whole seconds).
    time.sleep(1.1)
    for repository, image, tag in [
        ("local/app", c, "v3"),
        ("local/app", d, "v4"),
        ("local/ci/build", e, "pr-3"),
        ("local/ci/build", e, "stable"),
    ]:
        worker.run(_store(deps, repository, image, tag))

    # The pull record: kept for 30 days; pr-1 pulled yesterday, pr-2 twenty days ago, pr-3
    # never (it counts as pulled now); app:v1 yesterday (no pull rule covers app).
    now = time.time()
    with redis.Redis.from_url(redis_url) as client:
        client.set(since_key("local"), repr(now - 30 * DAY))
        client.zadd(
            pulls_key("local"),
            {
                tag_member("local/ci/build", "pr-1"): now - DAY,
                tag_member("local/ci/build", "pr-2"): now - 20 * DAY,
                tag_member("local/app", "v1"): now - DAY,
            },
        )

    # By hand: app keeps v3, v4 (the two latest v*) and latest; v1, v2 and feature-x go.
    # ci/build keeps v1 (its only v*), pr-1 and pr-3 (pulled within 14 days), stable; pr-2 goes.
    doomed = ["local/app:feature-x", "local/app:v1", "local/app:v2", "local/ci/build:pr-2"]
    kept = [
        "local/app:v3",
        "local/app:v4",
        "local/app:latest",
        "local/ci/build:v1",
        "local/ci/build:pr-1",
        "local/ci/build:pr-3",
        "local/ci/build:stable",
    ]

    dry = worker.run(apply_retention(deps, "local", dry_run=True))
    assert dry.outcome == "succeeded"
    assert sorted(dry.items) == doomed
    assert dry.examined.objects == len(doomed) + len(kept)
    assert all(_tagged(worker, item) for item in doomed + kept)

    report = worker.run(apply_retention(deps, "local"))
    assert report.outcome == "succeeded"
    assert sorted(report.items) == doomed
    assert report.deleted["tag"].objects == len(doomed)
    assert report.kept.objects == len(kept)
    assert [item for item in doomed + kept if _tagged(worker, item)] == kept
    # A tag goes, not its image: b (v2, feature-x) still pulls by digest.
    assert worker.run(deps.repositories.revision("local/app", Digest.parse(b.digest))) is not None

    # pr-3 got its first-seen record, and the record is kept in the bucket too.
    with redis.Redis.from_url(redis_url) as client:
        first_seen = client.zscore(pulls_key("local"), tag_member("local/ci/build", "pr-3"))
    assert first_seen is not None
    assert first_seen >= now
    assert worker.run(deps.objects.stat(snapshot_key("local"))) is not None

    # A second run finds nothing more to delete.
    again = worker.run(apply_retention(deps, "local"))
    assert again.items == []
