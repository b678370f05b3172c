"""The storage inventory and the online garbage collection, against a real bucket and edge."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import pytest
from redis.asyncio import Redis

from services.embedded import S3Server
from services.lifecycle_cli import lifecycle_deps
from shared.lifecycle.gc import collect
from shared.lifecycle.guard import CLAIMED
from shared.lifecycle.inventory import (
    RepositoryView,
    StoredBlob,
    blob_bytes,
    read_blobs,
    read_repositories,
)
from shared.lifecycle.runs import LifecycleReport
from shared.oci.digest import Digest
from shared.proxy import protocol
from shared.registry import layout
from shared.registry.blobs import BlobStore
from shared.registry.storage import ObjectStore
from shared.settings import S3Settings, Settings
from tests.fixtures.edge import PROJECTS, USERS, EdgeFactory, EdgeServer, build_settings
from tests.support.bucket import objects, read, write
from tests.support.images import OCI_MANIFEST, Image, canonical, make_image, make_index, make_layer, sha256
from tests.support.seed import push_blob, push_image, push_index, push_manifest

T = TypeVar("T")
ALICE = ("alice", USERS["alice"])
EMPTY_CONFIG = b"{}"


def make_referrer(subject: Image, label: str) -> tuple[bytes, dict[str, bytes]]:
    """A signature-like artifact whose subject is `subject`: (manifest, blobs)."""
    payload = f"signature of {subject.digest} {label}".encode()
    manifest = canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.signature",
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": sha256(EMPTY_CONFIG),
                "size": len(EMPTY_CONFIG),
            },
            "layers": [
                {"mediaType": "application/vnd.example.sig", "digest": sha256(payload), "size": len(payload)}
            ],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject.digest, "size": len(subject.manifest)},
        }
    )
    return manifest, {sha256(EMPTY_CONFIG): EMPTY_CONFIG, sha256(payload): payload}


def push_referrer(base_url: str, repo: str, subject: Image, label: str) -> str:
    manifest, blobs = make_referrer(subject, label)
    with httpx.Client(base_url=base_url, auth=ALICE, timeout=60) as client:
        for digest, data in blobs.items():
            push_blob(client, repo, digest, data)
        push_manifest(client, repo, sha256(manifest), manifest, OCI_MANIFEST)
    return sha256(manifest)


def run(job: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(job)


async def _inventory(s3: S3Settings) -> tuple[dict[str, RepositoryView], dict[Digest, StoredBlob]]:
    objects = ObjectStore(s3)
    try:
        listed: list[int] = []
        views = await read_repositories(objects, BlobStore(objects), progress=listed.append)
        stored = await read_blobs(objects)
        assert sum(listed) > 0
        return views, stored
    finally:
        objects.close()


def d(text: str) -> Digest:
    return Digest.parse(text)


def test_inventory_reads_images_tags_links_and_blobs_back(
    edge_factory: EdgeFactory, s3_settings: S3Settings, s3_server: S3Server
) -> None:
    edge = edge_factory(disk_cache={"max_bytes": 0})
    shared_layer = make_layer(size=3000, seed="shared")
    first = make_image([shared_layer, make_layer(size=2000, seed="a")], label="first")
    second = make_image([shared_layer], label="second")
    loose = make_image(label="loose")
    amd, arm = make_image(label="amd"), make_image(architecture="arm64", label="arm")
    index = make_index([(amd, "linux", "amd64"), (arm, "linux", "arm64")])
    push_image(edge.url, "local/app", first, tag="v1", auth=ALICE)
    push_image(edge.url, "local/app", second, tag="v2", auth=ALICE)
    signature = push_referrer(edge.url, "local/app", first, "one")
    push_image(edge.url, "local/other", loose, tag=None, auth=ALICE)
    push_index(edge.url, "local/multi", [amd, arm], index, tag="latest", auth=ALICE)

    views, stored = run(_inventory(s3_settings))

    assert sorted(views) == ["local/app", "local/multi", "local/other"]
    app = views["local/app"]
    assert {t: digest for t, (digest, _) in app.tags.items()} == {
        "v1": d(first.digest),
        "v2": d(second.digest),
    }
    assert set(app.images) == {d(first.digest), d(second.digest), d(signature)}
    image = app.images[d(first.digest)]
    assert image.tags == ("v1",)
    assert image.blobs == (d(sha256(first.config)), *(d(sha256(layer)) for layer in first.layers))
    assert image.size == len(first.manifest)
    assert image.pushed > 0
    assert app.images[d(signature)].subject == d(first.digest)
    # The signature is reachable through its subject's tag.
    assert app.reachable(untagged=False) == {d(first.digest), d(second.digest), d(signature)}
    assert app.links[d(sha256(shared_layer))][0] == len(shared_layer)
    assert views["local/other"].reachable(untagged=False) == set()
    assert views["local/other"].reachable(untagged=True) == {d(loose.digest)}
    multi = views["local/multi"]
    assert multi.images[d(sha256(index))].children == (d(amd.digest), d(arm.digest))
    assert multi.reachable(untagged=False) == {d(sha256(index)), d(amd.digest), d(arm.digest)}

    pushed: dict[str, bytes] = {}
    for each in (first, second, loose, amd, arm):
        pushed |= each.blobs | {each.digest: each.manifest}
    pushed[sha256(index)] = index
    pushed |= make_referrer(first, "one")[1] | {signature: make_referrer(first, "one")[0]}
    assert {str(digest): blob.size for digest, blob in stored.items()} == {
        k: len(v) for k, v in pushed.items()
    }
    assert all(blob.extents for blob in stored.values())

    # The app repository's unique bytes: three manifests, two configs, a shared layer
    # counted once, the signature's empty config and payload.
    app_blobs = first.blobs | second.blobs | make_referrer(first, "one")[1]
    expected = sum(len(v) for v in app_blobs.values()) + len(first.manifest) + len(second.manifest)
    expected += len(make_referrer(first, "one")[0])
    assert blob_bytes([app], {}) == expected


# -- garbage collection ---------------------------------------------------------------
GRACE = 1.0
# `tidy` deletes untagged manifests; `mirror` is pushed to like a hosted project, and the
# collection is told it is a proxy project (its links are a cache, kept until eviction).
GC_PROJECTS: list[dict[str, Any]] = [
    *PROJECTS,
    {"name": "tidy", "public": True, "push": ["alice"], "delete": ["alice"], "gc": {"delete_untagged": True}},
    {"name": "mirror", "public": True, "push": ["alice"], "delete": ["alice"]},
]


@pytest.fixture
def gc_edge(edge_factory: EdgeFactory) -> EdgeServer:
    return edge_factory(disk_cache={"max_bytes": 0}, projects=GC_PROJECTS)


@pytest.fixture
def gc_settings(redis_url: str, s3_settings: S3Settings, user_hashes: dict[str, str]) -> Settings:
    """What the collection runs with: the edge's projects, `mirror` as a proxy project."""
    projects = [p for p in GC_PROJECTS if p["name"] != "mirror"]
    projects.append({"name": "mirror", "type": "proxy", "upstream": "hub", "public": True})
    return build_settings(
        redis_url,
        s3_settings,
        user_hashes,
        projects=projects,
        upstreams=[{"name": "hub", "url": "http://127.0.0.1:9"}],
        lifecycle={"gc_grace": f"{GRACE}s"},
        upload_expiry="1s",
    )


async def _collect(settings: Settings, **kwargs: Any) -> LifecycleReport:
    assert settings.redis_url is not None
    async with lifecycle_deps(settings, settings.redis_url) as deps:
        return await collect(deps, **kwargs)


def gc(settings: Settings, **kwargs: Any) -> LifecycleReport:
    return run(_collect(settings, **kwargs))


def past_grace() -> None:
    """Let what was written so far age past the grace period (last-modified is in whole
    seconds, rounded down: an object may look up to a second older, never younger)."""
    time.sleep(GRACE + 0.1)


def blob_keys(s3_server: S3Server, bucket: str) -> set[str]:
    return set(objects(s3_server, bucket, "blobs/"))


def key_of(digest: str) -> str:
    return layout.blob(d(digest))


async def forget_claims(settings: Settings) -> None:
    redis = Redis.from_url(str(settings.redis_url))
    await redis.delete(CLAIMED)
    await redis.aclose()


def pulls_back(base_url: str, repo: str, reference: str, image: Image) -> None:
    """The image pulls byte for byte: its manifest by `reference`, then every blob."""
    with httpx.Client(base_url=base_url, timeout=60) as client:
        got = client.get(f"/v2/{repo}/manifests/{reference}", headers={"Accept": OCI_MANIFEST})
        assert got.status_code == 200, (repo, reference, got.text)
        assert got.content == image.manifest
        for digest, data in image.blobs.items():
            blob = client.get(f"/v2/{repo}/blobs/{digest}")
            assert blob.status_code == 200, (repo, digest, blob.text)
            assert blob.content == data


def delete_manifest(base_url: str, repo: str, digest: str) -> None:
    with httpx.Client(base_url=base_url, auth=ALICE, timeout=60) as client:
        response = client.delete(f"/v2/{repo}/manifests/{digest}")
        assert response.status_code == 202, response.text


def test_gc_deletes_exactly_the_blobs_no_image_references(
    gc_edge: EdgeServer, gc_settings: Settings, s3_server: S3Server, s3_settings: S3Settings
) -> None:
    bucket = s3_settings.bucket
    shared_layer = make_layer(size=5000, seed="shared")
    kept = make_image([shared_layer, make_layer(size=3000, seed="kept")], label="kept")
    dropped = make_image([shared_layer, make_layer(size=4000, seed="dropped")], label="dropped")
    push_image(gc_edge.url, "local/kept", kept, tag="v1", auth=ALICE)
    push_image(gc_edge.url, "local/dropped", dropped, tag="v1", auth=ALICE)
    delete_manifest(gc_edge.url, "local/dropped", dropped.digest)
    before = blob_keys(s3_server, bucket)
    unreferenced = {dropped.digest, sha256(dropped.config), sha256(dropped.layers[1])}
    data_of = {digest: read(s3_server, bucket, key_of(digest)) for digest in unreferenced}
    past_grace()

    dry = gc(gc_settings, dry_run=True)
    assert blob_keys(s3_server, bucket) == before
    assert {item for item in dry.items if item.startswith("blob ")} == {f"blob {x}" for x in unreferenced}

    report = gc(gc_settings)

    assert blob_keys(s3_server, bucket) == before - {key_of(x) for x in unreferenced}
    assert report.deleted["blob"].objects == 3
    sizes = len(dropped.manifest) + len(dropped.config) + len(dropped.layers[1])
    assert report.deleted["blob"].bytes == sizes
    assert report.kept.objects == len(before) - 3
    # Their bytes went with their records.
    remaining = set(objects(s3_server, bucket, ""))
    for record in data_of.values():
        for key, _ in json.loads(record)["extents"]:
            assert key not in remaining
    # The dropped repository's links went, and the project's entries for blobs it alone held.
    assert objects(s3_server, bucket, "repositories/local/dropped/_layers/") == []
    entries = set(objects(s3_server, bucket, "projects/local/_layers/"))
    assert layout.project_blob("local", d(sha256(dropped.layers[1]))) not in entries
    assert layout.project_blob("local", d(sha256(shared_layer))) in entries
    pulls_back(gc_edge.url, "local/kept", "v1", kept)
    # The shared layer still mounts into a new repository of the project.
    with httpx.Client(base_url=gc_edge.url, auth=ALICE, timeout=60) as client:
        mounted = client.post(
            "/v2/local/new/blobs/uploads/", params={"mount": sha256(shared_layer), "from": "local/kept"}
        )
        assert mounted.status_code == 201, mounted.text
    # Nothing is left to do.
    again = gc(gc_settings)
    assert again.deleted_objects == 0, again.items


def test_blob_without_manifest_survives_inside_the_grace_period_and_goes_after_it(
    gc_edge: EdgeServer, gc_settings: Settings, s3_server: S3Server, s3_settings: S3Settings
) -> None:
    bucket = s3_settings.bucket
    old, fresh = make_layer(size=2000, seed="old"), make_layer(size=2000, seed="fresh")
    unlinked = make_layer(size=2000, seed="unlinked")
    with httpx.Client(base_url=gc_edge.url, auth=ALICE, timeout=60) as client:
        push_blob(client, "local/loose", sha256(old), old)
        past_grace()
        now = time.time()
        push_blob(client, "local/loose", sha256(fresh), fresh)
        push_blob(client, "local/loose", sha256(unlinked), unlinked)
    # A blob committed whose link is not written yet (a fill between the two), after Redis
    # lost the claims (flushed): only its own age protects it.
    for key in (
        layout.layer_link("local/loose", d(sha256(unlinked))),
        layout.project_blob("local", d(sha256(unlinked))),
    ):
        s3_server.client().remove_object(bucket, key)
    run(forget_claims(gc_settings))

    report = gc(gc_settings, now=now)

    keys = blob_keys(s3_server, bucket)
    assert key_of(sha256(old)) not in keys
    assert key_of(sha256(fresh)) in keys
    assert key_of(sha256(unlinked)) in keys
    assert report.items == [
        f"blob {sha256(old)}",
        f"link local/loose@{sha256(old)}",
        f"project_link local@{sha256(old)}",
    ]
    with httpx.Client(base_url=gc_edge.url, timeout=60) as client:
        assert client.get(f"/v2/local/loose/blobs/{sha256(fresh)}").content == fresh
        assert client.get(f"/v2/local/loose/blobs/{sha256(old)}").status_code == 404


def test_delete_untagged_removes_only_manifests_nothing_reaches(
    gc_edge: EdgeServer, gc_settings: Settings, s3_server: S3Server, s3_settings: S3Settings
) -> None:
    url = gc_edge.url
    tagged = make_image(label="tagged")
    amd, arm = make_image(label="amd"), make_image(architecture="arm64", label="arm")
    index = make_index([(amd, "linux", "amd64"), (arm, "linux", "arm64")])
    loose = make_image([make_layer(size=1500, seed="loose")], label="loose")
    replaced, successor = make_image(label="replaced"), make_image(label="successor")
    kept_loose = make_image(label="kept-loose")
    push_image(url, "tidy/app", tagged, tag="v1", auth=ALICE)
    signature = push_referrer(url, "tidy/app", tagged, "sig")
    push_index(url, "tidy/app", [amd, arm], index, tag="multi", auth=ALICE)
    push_image(url, "tidy/app", loose, tag=None, auth=ALICE)
    push_image(url, "tidy/app", replaced, tag="moving", auth=ALICE)
    push_image(url, "tidy/app", successor, tag="moving", auth=ALICE)
    # A project that keeps untagged manifests (the default).
    push_image(url, "local/app", kept_loose, tag=None, auth=ALICE)
    past_grace()

    report = gc(gc_settings)

    manifests = {item for item in report.items if item.startswith("manifest ")}
    assert manifests == {f"manifest tidy/app@{loose.digest}", f"manifest tidy/app@{replaced.digest}"}
    keys = blob_keys(s3_server, s3_settings.bucket)
    assert key_of(loose.digest) not in keys
    assert key_of(sha256(loose.layers[0])) not in keys
    for image, reference in ((tagged, "v1"), (amd, amd.digest), (arm, arm.digest), (successor, "moving")):
        pulls_back(url, "tidy/app", reference, image)
    pulls_back(url, "local/app", kept_loose.digest, kept_loose)
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get(f"/v2/tidy/app/manifests/{signature}").status_code == 200
        referrers = client.get(f"/v2/tidy/app/referrers/{tagged.digest}").json()["manifests"]
        assert [r["digest"] for r in referrers] == [signature]
        assert client.get(f"/v2/tidy/app/manifests/{sha256(index)}").content == index
        assert client.get(f"/v2/tidy/app/manifests/{loose.digest}").status_code == 404


def test_proxy_links_stay_until_eviction(
    gc_edge: EdgeServer, gc_settings: Settings, s3_server: S3Server, s3_settings: S3Settings
) -> None:
    """A proxy project's blobs fetched for no manifest yet (a prefetch) are its cache."""
    cached = make_layer(size=1000, seed="cached")
    with httpx.Client(base_url=gc_edge.url, auth=ALICE, timeout=60) as client:
        push_blob(client, "mirror/library/app", sha256(cached), cached)
    past_grace()

    report = gc(gc_settings)

    assert report.deleted_objects == 0, report.items
    assert key_of(sha256(cached)) in blob_keys(s3_server, s3_settings.bucket)


def test_orphans_go_and_running_uploads_and_fills_stay(
    gc_edge: EdgeServer,
    gc_settings: Settings,
    s3_server: S3Server,
    s3_settings: S3Settings,
    redis_url: str,
) -> None:
    bucket = s3_settings.bucket
    with httpx.Client(base_url=gc_edge.url, auth=ALICE, timeout=60) as client:
        started = client.post("/v2/local/up/blobs/uploads/")
        sent = client.patch(started.headers["Location"], content=b"x" * 1000)
        assert sent.status_code == 202, sent.text
    abandoned = set(objects(s3_server, bucket, "extents/"))
    fill, running = d(sha256(b"failed fill")), d(sha256(b"running fill"))
    orphans = {
        layout.fill_segment(fill, 0),
        "extents/0123456789abcdef0123456789abcdef/0000000000000000.00000000000000aa",
        f"blobdata/sha256/{'ab' * 32}/00000000000000aa",
    }
    for key in orphans:
        write(s3_server, bucket, key, b"left behind")
    running_segment = layout.fill_segment(running, 0)
    write(s3_server, bucket, running_segment, b"being filled")
    write(s3_server, bucket, f"quarantine/sha256/{'cd' * 32}/stamp", b"kept for inspection")
    past_grace()

    async def hold_fill_lease() -> None:
        redis = Redis.from_url(redis_url)
        await redis.set(protocol.lease_key(running), "a fill", px=30_000)
        await redis.aclose()

    run(hold_fill_lease())
    report = gc(gc_settings)

    remaining = set(objects(s3_server, bucket, ""))
    assert not orphans & remaining
    assert not abandoned & remaining
    assert objects(s3_server, bucket, "uploads/") == []
    assert running_segment in remaining
    assert f"quarantine/sha256/{'cd' * 32}/stamp" in remaining
    assert report.deleted["upload"].objects == 1
    assert report.deleted["segment"].objects == 1
    assert report.deleted["orphan"].objects == 2


def test_every_acknowledged_push_pulls_back_after_gc_runs_during_pushes_and_pulls(
    gc_edge: EdgeServer, gc_settings: Settings
) -> None:
    """Ten clients push two images each while others pull and collections run back to back.
    Each image has a layer its client uploaded on its own a little more than the grace
    period before (a client that pushes again what it pushed once): unreferenced and past
    the grace, it is what a collection deletes, while the client finds it stored and skips
    it. Without the reference guard, manifests end up naming deleted blobs."""
    url = gc_edge.url
    kept = make_image([make_layer(size=20_000, seed="kept")], label="kept")
    push_image(url, "local/kept", kept, tag="v1", auth=ALICE)
    done = threading.Event()
    runs: list[LifecycleReport] = []
    acknowledged: dict[tuple[str, str], Image] = {}
    failures: list[str] = []

    def collect_until_done() -> None:
        while not done.is_set():
            runs.append(gc(gc_settings))

    def push(t: int) -> None:
        repo = f"local/c{t}"
        rng = random.Random(t)
        for j in range(2):
            early = make_layer(size=2000, seed=f"early-{t}-{j}")
            image = make_image([early, make_layer(size=1000, seed=f"new-{t}-{j}")], label=f"new-{t}-{j}")
            with httpx.Client(base_url=url, auth=ALICE, timeout=60) as client:
                push_blob(client, repo, sha256(early), early)
            time.sleep(GRACE + rng.uniform(0.0, 0.6))
            for _attempt in range(5):  # as a client retries a push that failed
                try:
                    push_image(url, repo, image, tag=f"v{j}", auth=ALICE)
                except AssertionError as exc:
                    failures.append(str(exc)[:300])
                    time.sleep(0.05)
                    continue
                acknowledged[(repo, f"v{j}")] = image
                break

    def pull() -> None:
        while not done.is_set():
            pulls_back(url, "local/kept", "v1", kept)

    collector = threading.Thread(target=collect_until_done)
    collector.start()
    try:
        with ThreadPoolExecutor(max_workers=13) as pool:
            pullers = [pool.submit(pull) for _ in range(3)]
            pushers = [pool.submit(push, t) for t in range(10)]
            for pushed in pushers:
                pushed.result()
            done.set()
            for pulled in pullers:
                pulled.result()
    finally:
        done.set()
        collector.join()
    runs.append(gc(gc_settings))

    assert len(acknowledged) == 20, failures
    assert len(runs) >= 3
    assert all(r.outcome == "succeeded" for r in runs)
    for (repo, tag), image in sorted(acknowledged.items()):
        pulls_back(url, repo, tag, image)
    pulls_back(url, "local/kept", "v1", kept)
