"""What is pushed lives in the bucket: a restarted edge with an empty Redis serves it all.

Also the maintenance job that purges abandoned upload sessions, run as the plain async
function against the test's bucket.
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import httpx
import pytest
import redis

from services.embedded import S3Server
from shared.registry import layout
from shared.settings import S3Settings, Settings
from tests.fixtures.edge import USERS, EdgeServer, build_settings
from tests.fixtures.servers import InProcessWorker
from tests.support.images import (
    OCI_INDEX,
    OCI_MANIFEST,
    canonical,
    make_image,
    make_index,
    make_layer,
    sha256,
)
from workers.maintenance import purge_expired_uploads

ALICE = ("alice", USERS["alice"])
BOB = ("bob", USERS["bob"])
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
SBOM = "application/vnd.example.sbom.v1+json"


def client(edge: EdgeServer, auth: tuple[str, str] | None = None) -> httpx.Client:
    return httpx.Client(base_url=edge.url, auth=auth, timeout=60)


def put(http: httpx.Client, repo: str, reference: str, body: bytes, media_type: str) -> httpx.Response:
    response = http.put(
        f"/v2/{repo}/manifests/{reference}", content=body, headers={"Content-Type": media_type}
    )
    assert response.status_code == 201, response.text
    return response


def push_blob(http: httpx.Client, repo: str, data: bytes) -> None:
    response = http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha256(data)}, content=data)
    assert response.status_code == 201, response.text


def push_chunked(http: httpx.Client, repo: str, data: bytes) -> None:
    """POST, two PATCHes and a PUT, as docker pushes layers."""
    start = http.post(f"/v2/{repo}/blobs/uploads/")
    assert start.status_code == 202
    url = start.headers["Location"]
    half = len(data) // 2
    for offset, chunk in ((0, data[:half]), (half, data[half:])):
        patch = http.patch(
            url, content=chunk, headers={"Content-Range": f"{offset}-{offset + len(chunk) - 1}"}
        )
        assert patch.status_code == 202, patch.text
    done = http.put(url, params={"digest": sha256(data)})
    assert done.status_code == 201, done.text


def snapshot(edge: EdgeServer, repos: dict[str, list[str]], blobs: dict[str, list[str]]) -> dict[str, Any]:
    """Everything a client can read back: manifests (bytes and headers), blobs, tags,
    referrers and the catalog, as alice, bob and anonymous see them."""
    seen: dict[str, Any] = {}
    with client(edge, ALICE) as alice, client(edge, BOB) as bob, client(edge) as anonymous:
        for repo, references in repos.items():
            for reference in references:
                response = alice.get(f"/v2/{repo}/manifests/{reference}")
                assert response.status_code == 200, (repo, reference, response.text)
                seen[f"{repo}@{reference}"] = (
                    response.content,
                    response.headers["Content-Type"],
                    response.headers["Docker-Content-Digest"],
                )
            seen[f"{repo} tags"] = alice.get(f"/v2/{repo}/tags/list").json()
            for digest in references:
                if digest.startswith("sha256:"):
                    referrers = alice.get(f"/v2/{repo}/referrers/{digest}")
                    seen[f"{repo} referrers {digest}"] = (
                        referrers.headers["Content-Type"],
                        referrers.json(),
                    )
        for repo, digests in blobs.items():
            for digest in digests:
                response = alice.get(f"/v2/{repo}/blobs/{digest}")
                assert response.status_code == 200, (repo, digest)
                assert sha256(response.content) == digest
                seen[f"{repo} blob {digest}"] = response.content
        seen["catalog alice"] = alice.get("/v2/_catalog").json()
        seen["catalog bob"] = bob.get("/v2/_catalog").json()
        seen["catalog anonymous"] = anonymous.get("/v2/_catalog").json()
        seen["bob pulls private"] = bob.get("/v2/private/secret/manifests/v1").status_code
        seen["anonymous pulls private"] = anonymous.get("/v2/private/secret/manifests/v1").status_code
        seen["bob pushes"] = bob.post("/v2/local/app/blobs/uploads/").status_code
        seen["bob version check"] = bob.get("/v2/").status_code
    return seen


@pytest.fixture
def settings(redis_url: str, s3_settings: S3Settings, user_hashes: dict[str, str]) -> Settings:
    return build_settings(redis_url, s3_settings, user_hashes)


def test_restart_and_redis_flush_lose_nothing(settings: Settings, redis_url: str) -> None:
    layers = [make_layer({"a.txt": b"a"}), make_layer(size=300_000, seed="persist")]
    image = make_image(layers, label="persist")
    arm = make_image([make_layer({"arm.txt": b"arm"})], architecture="arm64", label="persist-arm")
    index = make_index([(image, "linux", "amd64"), (arm, "linux", "arm64")])
    sbom_layer = b'{"packages": ["everything"]}'
    referrer = canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": SBOM,
            "config": {"mediaType": OCI_EMPTY, "digest": sha256(b"{}"), "size": 2},
            "layers": [{"mediaType": SBOM, "digest": sha256(sbom_layer), "size": len(sbom_layer)}],
            "subject": {
                "mediaType": OCI_MANIFEST,
                "digest": image.digest,
                "size": len(image.manifest),
            },
            "annotations": {"org.example.kind": "sbom"},
        }
    )
    secret = make_image(label="persist-private")

    with EdgeServer(settings) as first, client(first, ALICE) as alice:
        for data in [image.config, image.layers[0], arm.config, *arm.layers, b"{}", sbom_layer]:
            push_blob(alice, "local/app", data)
        push_chunked(alice, "local/app", image.layers[1])
        put(alice, "local/app", image.digest, image.manifest, OCI_MANIFEST)
        put(alice, "local/app", "v1", image.manifest, OCI_MANIFEST)
        put(alice, "local/app", "arm", arm.manifest, OCI_MANIFEST)
        put(alice, "local/app", "multi", index, OCI_INDEX)
        pushed = put(alice, "local/app", sha256(referrer), referrer, OCI_MANIFEST)
        assert pushed.headers["OCI-Subject"] == image.digest
        for data in secret.blobs.values():
            push_blob(alice, "private/secret", data)
        put(alice, "private/secret", "v1", secret.manifest, OCI_MANIFEST)

        repos = {
            "local/app": [
                "v1",
                "arm",
                "multi",
                image.digest,
                arm.digest,
                sha256(index),
                sha256(referrer),
            ],
            "private/secret": ["v1", secret.digest],
        }
        blobs = {
            "local/app": [
                sha256(b) for b in [image.config, *image.layers, arm.config, *arm.layers, b"{}", sbom_layer]
            ],
            "private/secret": list(secret.blobs),
        }
        before = snapshot(first, repos, blobs)
        token = alice.get(f"{first.url}/token").json()["token"]

    with redis.Redis.from_url(redis_url) as r:
        r.flushdb()
        assert r.dbsize() == 0

    # The same settings, so the same address, bucket and (now empty) Redis database.
    with EdgeServer(settings) as second:
        after = snapshot(second, repos, blobs)
        # The token signing secret lives in the bucket, so a token issued before the
        # restart is still good after it.
        with httpx.Client(base_url=second.url, headers={"Authorization": f"Bearer {token}"}) as bearer:
            assert bearer.get("/v2/private/secret/manifests/v1").content == secret.manifest
        with client(second, ALICE) as alice:
            referrers = alice.get(
                f"/v2/local/app/referrers/{image.digest}", params={"artifactType": SBOM}
            ).json()
            # A new push works after the restart too.
            extra = make_image(label="after-restart")
            for data in extra.blobs.values():
                push_blob(alice, "local/app", data)
            put(alice, "local/app", "v2", extra.manifest, OCI_MANIFEST)

    assert after == before
    # Spot checks, so that an empty snapshot could not compare equal.
    assert before["local/app@v1"] == (image.manifest, OCI_MANIFEST, image.digest)
    assert before["local/app@multi"] == (index, OCI_INDEX, sha256(index))
    assert before[f"local/app@{sha256(referrer)}"][0] == referrer
    assert before[f"local/app blob {sha256(image.layers[1])}"] == image.layers[1]
    assert before["local/app tags"] == {"name": "local/app", "tags": ["arm", "multi", "v1"]}
    assert before["catalog alice"] == {"repositories": ["local/app", "private/secret"]}
    assert before["catalog anonymous"] == {"repositories": ["local/app"]}
    assert (before["bob pulls private"], before["anonymous pulls private"]) == (200, 401)
    assert (before["bob pushes"], before["bob version check"]) == (403, 200)
    listed = before[f"local/app referrers {image.digest}"][1]["manifests"]
    assert listed == [
        {
            "mediaType": OCI_MANIFEST,
            "digest": sha256(referrer),
            "size": len(referrer),
            "artifactType": SBOM,
            "annotations": {"org.example.kind": "sbom"},
        }
    ]
    assert referrers["manifests"] == listed


# --------------------------------------------------------------------------- upload janitor


def _age(s3_server: S3Server, bucket: str, upload_id: str, seconds: float) -> None:
    """Backdate an upload session's start, as if it had been abandoned `seconds` ago."""
    minio = s3_server.client()
    key = layout.upload_info(upload_id)
    response = minio.get_object(bucket, key)
    try:
        info = json.loads(response.read())
    finally:
        response.close()
        response.release_conn()
    info["started"] = time.time() - seconds
    data = json.dumps(info).encode()
    minio.put_object(bucket, key, io.BytesIO(data), len(data))


def test_purge_expired_uploads_removes_only_old_sessions(
    worker: InProcessWorker, edge: EdgeServer, s3_server: S3Server, s3_settings: S3Settings
) -> None:
    minio = s3_server.client()

    def upload_keys(upload_id: str) -> list[str]:
        """The session's state and its parts (kept apart: committed parts outlive the session)."""
        return [
            o.object_name or ""
            for prefix in (f"uploads/{upload_id}/", f"extents/{upload_id}/")
            for o in minio.list_objects(s3_settings.bucket, prefix, recursive=True)
        ]

    with client(edge, ALICE) as alice:
        sessions = {}
        for name in ("old", "fresh", "almost"):
            start = alice.post("/v2/local/app/blobs/uploads/")
            assert start.status_code == 202
            sessions[name] = start.headers["Docker-Upload-UUID"]
            assert alice.patch(start.headers["Location"], content=name.encode() * 10).status_code == 202
        _age(s3_server, s3_settings.bucket, sessions["old"], 2 * 3600)
        _age(s3_server, s3_settings.bucket, sessions["almost"], 3600 - 120)
        assert len(upload_keys(sessions["old"])) == 3  # its info, one part and that part's hash

        assert worker.run(purge_expired_uploads(worker.context)) == 1
        assert upload_keys(sessions["old"]) == []
        old = alice.get(f"/v2/local/app/blobs/uploads/{sessions['old']}")
        assert old.status_code == 404
        assert old.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
        for name in ("fresh", "almost"):
            status = alice.get(f"/v2/local/app/blobs/uploads/{sessions[name]}")
            assert status.status_code == 204
            assert status.headers["Range"] == f"0-{len(name) * 10 - 1}"

        # Safe to run again: nothing more is old enough.
        assert worker.run(purge_expired_uploads(worker.context)) == 0
        data = b"fresh" * 10
        done = alice.put(f"/v2/local/app/blobs/uploads/{sessions['fresh']}", params={"digest": sha256(data)})
        assert done.status_code == 201
        assert alice.get(f"/v2/local/app/blobs/{sha256(data)}").content == data


def _stored(s3_server: S3Server, bucket: str, digest: str) -> tuple[int, dict[str, str], bytes]:
    """The object under the blob's digest key: its size, its seawall metadata, its body."""
    from shared.oci.digest import Digest

    minio = s3_server.client()
    key = layout.blob(Digest.parse(digest))
    info = minio.stat_object(bucket, key)
    metadata = {
        k.lower().removeprefix("x-amz-meta-"): v
        for k, v in (info.metadata or {}).items()
        if k.lower().startswith("x-amz-meta-seawall")
    }
    response = minio.get_object(bucket, key)
    try:
        return int(info.size or 0), metadata, response.read()
    finally:
        response.close()
        response.release_conn()


def _patch_in(http: httpx.Client, repo: str, chunks: list[bytes]) -> str:
    """POST and one PATCH per chunk; returns the session URL, ready for the PUT."""
    start = http.post(f"/v2/{repo}/blobs/uploads/")
    assert start.status_code == 202
    url = start.headers["Location"]
    offset = 0
    for chunk in chunks:
        range_ = f"{offset}-{offset + len(chunk) - 1}"
        patch = http.patch(url, content=chunk, headers={"Content-Range": range_})
        assert patch.status_code == 202, patch.text
        url = patch.headers["Location"]
        offset += len(chunk)
    return url


def test_pushed_parts_become_the_blob_without_being_written_again(
    edge: EdgeServer, s3_server: S3Server, s3_settings: S3Settings
) -> None:
    mib = 1024 * 1024
    chunks = [os.urandom(5 * mib), os.urandom(5 * mib), os.urandom(mib + 7)]
    data = b"".join(chunks)
    digest = sha256(data)
    with client(edge, ALICE) as alice:
        url = _patch_in(alice, "local/extents", chunks)
        upload_id = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
        assert alice.put(url, params={"digest": digest}).status_code == 201

        size, metadata, body = _stored(s3_server, s3_settings.bucket, digest)
        assert metadata == {"seawall-extents": "3", "seawall-size": str(len(data))}
        record = json.loads(body)
        assert record["size"] == len(data)
        # The parts, each under a key of its own that no later write can reuse.
        names = [key.removeprefix(layout.upload_parts(upload_id)) for key, _ in record["extents"]]
        assert [name.split(".")[0] for name in names] == [f"{o:016d}" for o in (0, 5 * mib, 10 * mib)]
        assert all(key.startswith(layout.upload_parts(upload_id)) for key, _ in record["extents"])
        assert len({name.split(".")[1] for name in names}) == 3
        assert size < 4096  # a record, not a second copy of 11 MiB

        # The session is gone, its parts are the blob now.
        minio = s3_server.client()
        assert list(minio.list_objects(s3_settings.bucket, f"uploads/{upload_id}/", recursive=True)) == []

        whole = alice.get(f"/v2/local/extents/blobs/{digest}")
        assert whole.status_code == 200
        assert whole.content == data
        head = alice.head(f"/v2/local/extents/blobs/{digest}")
        assert head.headers["Content-Length"] == str(len(data))
        # A range across both boundaries between extents.
        lo, hi = 5 * mib - 3, 10 * mib + 3
        ranged = alice.get(f"/v2/local/extents/blobs/{digest}", headers={"Range": f"bytes={lo}-{hi}"})
        assert ranged.status_code == 206
        assert ranged.content == data[lo : hi + 1]

        # The same content pushed again: the blob stays as it was, the new parts are dropped.
        again = _patch_in(alice, "local/extents", [data])
        again_id = again.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
        assert alice.put(again, params={"digest": digest}).status_code == 201
        assert list(minio.list_objects(s3_settings.bucket, f"extents/{again_id}/", recursive=True)) == []
        assert json.loads(_stored(s3_server, s3_settings.bucket, digest)[2]) == record
        assert alice.get(f"/v2/local/extents/blobs/{digest}").content == data


def test_small_chunks_are_joined_into_one_object(
    edge: EdgeServer, s3_server: S3Server, s3_settings: S3Settings
) -> None:
    chunks = [os.urandom(1000) for _ in range(20)]
    data = b"".join(chunks)
    with client(edge, ALICE) as alice:
        url = _patch_in(alice, "local/extents", chunks)
        upload_id = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
        assert alice.put(url, params={"digest": sha256(data)}).status_code == 201
        _size, metadata, body = _stored(s3_server, s3_settings.bucket, sha256(data))
        record = json.loads(body)
        assert metadata == {"seawall-extents": "1", "seawall-size": str(len(data))}
        [(key, extent_size)] = record["extents"]
        assert key.startswith("blobdata/")
        assert extent_size == len(data)
        response = s3_server.client().get_object(s3_settings.bucket, key)
        try:
            assert response.read() == data
        finally:
            response.close()
            response.release_conn()
        # The small parts are gone: they were joined.
        minio = s3_server.client()
        assert list(minio.list_objects(s3_settings.bucket, f"extents/{upload_id}/", recursive=True)) == []
        assert alice.get(f"/v2/local/extents/blobs/{sha256(data)}").content == data


def test_janitor_keeps_the_parts_of_a_blob_committed_just_before_a_stop(
    worker: InProcessWorker, edge: EdgeServer, s3_server: S3Server, s3_settings: S3Settings
) -> None:
    """A stop between committing the record and deleting the session leaves both behind;
    the janitor must then remove the session only, never the blob's bytes."""
    data = os.urandom(6 * 1024 * 1024)
    digest = sha256(data)
    minio = s3_server.client()
    with client(edge, ALICE) as alice:
        url = _patch_in(alice, "local/janitor", [data])
        upload_id = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
        assert alice.put(url, params={"digest": digest}).status_code == 201
        # Put back what the stop would have left: the session's info and commit marker.
        for key, body in (
            (layout.upload_info(upload_id), json.dumps({"name": "local/janitor", "started": 0}).encode()),
            (layout.upload_committed(upload_id), digest.encode()),
        ):
            minio.put_object(s3_settings.bucket, key, io.BytesIO(body), len(body))
        # And an abandoned session whose marker names a blob that was never committed.
        abandoned = _patch_in(alice, "local/janitor", [os.urandom(5 * 1024 * 1024)])
        abandoned_id = abandoned.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
        marker = sha256(b"never committed").encode()
        minio.put_object(
            s3_settings.bucket, layout.upload_committed(abandoned_id), io.BytesIO(marker), len(marker)
        )
        _age(s3_server, s3_settings.bucket, abandoned_id, 2 * 3600)

        assert worker.run(purge_expired_uploads(worker.context)) == 2

        def keys(prefix: str) -> list[str]:
            listing = minio.list_objects(s3_settings.bucket, prefix, recursive=True)
            return [o.object_name or "" for o in listing]

        assert keys(f"uploads/{upload_id}/") == []
        [part] = keys(f"extents/{upload_id}/")
        assert part.startswith(f"{layout.upload_parts(upload_id)}{0:016d}.")
        assert keys(f"uploads/{abandoned_id}/") == []
        assert keys(f"extents/{abandoned_id}/") == []
        assert alice.get(f"/v2/local/janitor/blobs/{digest}").content == data


def test_purging_a_stray_write_under_a_committed_upload_keeps_the_blob(
    worker: InProcessWorker, edge: EdgeServer, s3_server: S3Server, s3_settings: S3Settings
) -> None:
    # A chunk arriving after its session was committed and closed is refused, but may leave
    # its hash record under the closed session's prefix: the janitor then finds a session
    # without info or commit marker. The parts under that id are the blob's extents.
    minio = s3_server.client()
    data = b"committed in one chunk " * 4096
    with client(edge, ALICE) as alice:
        start = alice.post("/v2/local/app/blobs/uploads/")
        upload_id = start.headers["Docker-Upload-UUID"]
        # One chunk, hashed as it arrived: the committed blob's extent is that part itself.
        chunk = alice.patch(start.headers["Location"], content=data)
        done = alice.put(chunk.headers["Location"], params={"digest": sha256(data)})
        assert done.status_code == 201
        stray = f"uploads/{upload_id}/sha256/0000000000000000.late"
        minio.put_object(s3_settings.bucket, stray, io.BytesIO(b"x"), 1)

        worker.run(purge_expired_uploads(worker.context))

        assert list(minio.list_objects(s3_settings.bucket, f"uploads/{upload_id}/", recursive=True)) == []
        # Every object the blob's record names is still in the bucket (the edge's disk tier
        # could serve the blob without them).
        _, _, record = _stored(s3_server, s3_settings.bucket, sha256(data))
        extents = [key for key, _ in json.loads(record)["extents"]]
        assert any(key.startswith(f"extents/{upload_id}/") for key in extents)
        for key in extents:
            minio.stat_object(s3_settings.bucket, key)
        pulled = alice.get(f"/v2/local/app/blobs/{sha256(data)}")
        assert pulled.status_code == 200
        assert pulled.content == data
