"""What a committed digest serves never changes, and bytes that do not match it are never served.

Against a real edge and SeaweedFS: chunks that race the commit, chunks sent concurrently,
large multi-part uploads with a wrong digest, and stored bytes damaged behind the
registry's back (found by a client's read, by sharing a copy, or by the scrub).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from pathlib import Path

import httpx
import pytest

from services.embedded import S3Server
from shared.metrics import BLOB_CORRUPTIONS, CORRUPTION_PLACES
from shared.oci.digest import Digest
from shared.registry import layout
from shared.settings import S3Settings
from tests.fixtures.edge import USERS, EdgeFactory, EdgeServer
from tests.support.bucket import damage, objects, write
from tests.support.images import sha256

ALICE = ("alice", USERS["alice"])
MIB = 1024 * 1024


def _client(edge: EdgeServer) -> httpx.Client:
    return httpx.Client(base_url=edge.url, auth=ALICE, timeout=60)


def _basic() -> str:
    return "Basic " + base64.b64encode(f"{ALICE[0]}:{ALICE[1]}".encode()).decode()


class RawPatch:
    """A PATCH sent by hand over a socket, so its body can be held half-sent."""

    def __init__(self, edge: EdgeServer, location: str, length: int) -> None:
        host, port = edge.address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        head = (
            f"PATCH {location} HTTP/1.1\r\nHost: {edge.address}\r\nAuthorization: {_basic()}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
        )
        self.sock.sendall(head.encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, bytes]:
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line)
        length = int(headers.get("Content-Length", "0"))
        while len(body) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            body += chunk
        self.sock.close()
        return int(head.split(b" ", 2)[1]), body


def _start(http: httpx.Client, repo: str) -> str:
    started = http.post(f"/v2/{repo}/blobs/uploads/")
    assert started.status_code == 202, started.text
    return started.headers["Location"]


def _wait_for_handler() -> None:
    # The edge has read the headers, found the session and begun storing the chunk.
    time.sleep(0.5)


def _corruptions() -> float:
    return sum(BLOB_CORRUPTIONS.labels(where)._value.get() for where in CORRUPTION_PLACES)


@pytest.fixture
def bucket_edge(edge_factory: EdgeFactory) -> EdgeServer:
    """An edge that reads blobs from the bucket only (no disk tier)."""
    return edge_factory(disk_cache={"max_bytes": 0})


def test_a_chunk_still_arriving_when_the_upload_is_committed_cannot_change_the_blob(
    bucket_edge: EdgeServer, edge_factory: EdgeFactory
) -> None:
    data = os.urandom(300_000)
    late = os.urandom(300_000)
    digest = sha256(data)
    with _client(bucket_edge) as alice:
        location = _start(alice, "local/race")
        held = RawPatch(bucket_edge, location, len(late))
        held.send(late[:1000])
        _wait_for_handler()
        patch = alice.patch(location, content=data, headers={"Content-Range": f"0-{len(data) - 1}"})
        assert patch.status_code == 202, patch.text
        done = alice.put(patch.headers["Location"], params={"digest": digest})
        assert done.status_code == 201, done.text

        held.send(late[1000:])
        status, body = held.response()
        assert status == 404, body
        assert json.loads(body)["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"

        assert alice.get(f"/v2/local/race/blobs/{digest}").content == data
        # Another project pushing the same digest shares a copy that still holds `data`.
        assert (
            alice.post("/v2/private/race/blobs/uploads/", params={"digest": digest}, content=data).status_code
            == 201
        )
    # A fresh edge (nothing cached in memory) reads the bucket: still `data` everywhere.
    with _client(edge_factory(disk_cache={"max_bytes": 0})) as alice:
        for repo in ("local/race", "private/race"):
            response = alice.get(f"/v2/{repo}/blobs/{digest}")
            assert response.status_code == 200
            assert response.content == data
            assert response.headers["Docker-Content-Digest"] == digest


def test_chunks_sent_at_once_to_one_offset_make_the_upload_invalid(bucket_edge: EdgeServer) -> None:
    first, second = os.urandom(200_000), os.urandom(200_000)
    with _client(bucket_edge) as alice:
        location = _start(alice, "local/concurrent")
        patches = [RawPatch(bucket_edge, location, len(first)), RawPatch(bucket_edge, location, len(second))]
        for raw, data in zip(patches, (first, second), strict=True):
            raw.send(data[:100])
        _wait_for_handler()
        for raw, data in zip(patches, (first, second), strict=True):
            raw.send(data[100:])
        assert [raw.response()[0] for raw in patches] == [202, 202]
        for data in (first, second):
            done = alice.put(location, params={"digest": sha256(data)})
            assert done.status_code == 400, done.text
            assert done.json()["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
            assert alice.head(f"/v2/local/concurrent/blobs/{sha256(data)}").status_code == 404


def test_a_wrong_digest_on_an_upload_of_several_large_parts_commits_nothing(
    bucket_edge: EdgeServer, s3_server: S3Server, s3_settings: S3Settings
) -> None:
    chunks = [os.urandom(5 * MIB), os.urandom(5 * MIB), os.urandom(MIB)]
    data = b"".join(chunks)
    wrong = sha256(data[:-1] + b"x")
    with _client(bucket_edge) as alice:
        location = _start(alice, "local/multipart")
        offset = 0
        for chunk in chunks:
            patch = alice.patch(
                location, content=chunk, headers={"Content-Range": f"{offset}-{offset + len(chunk) - 1}"}
            )
            assert patch.status_code == 202, patch.text
            offset += len(chunk)
        refused = alice.put(location, params={"digest": wrong})
        assert refused.status_code == 400, refused.text
        assert refused.json()["errors"][0]["code"] == "DIGEST_INVALID"
        assert alice.head(f"/v2/local/multipart/blobs/{wrong}").status_code == 404
        assert objects(s3_server, s3_settings.bucket, layout.blob(Digest.parse(wrong))) == []
        # The session stays usable: the right digest commits it.
        done = alice.put(location, params={"digest": sha256(data)})
        assert done.status_code == 201, done.text
        assert alice.get(f"/v2/local/multipart/blobs/{sha256(data)}").content == data


def test_stored_bytes_that_do_not_match_their_digest_are_never_served_and_are_quarantined(
    edge_factory: EdgeFactory, s3_server: S3Server, s3_settings: S3Settings
) -> None:
    data = os.urandom(3 * MIB)
    digest = sha256(data)
    with _client(edge_factory(disk_cache={"max_bytes": 0})) as alice:
        assert (
            alice.post("/v2/local/rot/blobs/uploads/", params={"digest": digest}, content=data).status_code
            == 201
        )
    _, damaged = damage(s3_server, s3_settings.bucket, digest)
    before = _corruptions()

    with _client(edge_factory(disk_cache={"max_bytes": 0})) as alice:
        # The damage is found at the last byte: the response is cut short, never completed.
        with pytest.raises(httpx.HTTPError):
            alice.get(f"/v2/local/rot/blobs/{digest}").read()
        assert BLOB_CORRUPTIONS.labels("stream")._value.get() >= 1
        assert _corruptions() == before + 1
        quarantined = objects(s3_server, s3_settings.bucket, f"quarantine/sha256/{digest[7:]}/")
        assert len(quarantined) == 1
        gone = alice.get(f"/v2/local/rot/blobs/{digest}")
        assert gone.status_code == 404
        assert gone.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
        assert damaged[:4096] not in gone.content
        # Pushing the content again restores it.
        assert (
            alice.post("/v2/local/rot/blobs/uploads/", params={"digest": digest}, content=data).status_code
            == 201
        )
        assert alice.get(f"/v2/local/rot/blobs/{digest}").content == data


def test_the_disk_tier_does_not_serve_or_keep_a_damaged_blob(
    edge_factory: EdgeFactory, s3_server: S3Server, s3_settings: S3Settings, tmp_path: Path
) -> None:
    data = os.urandom(2 * MIB)
    digest = sha256(data)
    edge = edge_factory(data_dir=str(tmp_path))
    with _client(edge) as alice:
        assert (
            alice.post("/v2/local/tier/blobs/uploads/", params={"digest": digest}, content=data).status_code
            == 201
        )
        damage(s3_server, s3_settings.bucket, digest)
        with pytest.raises(httpx.HTTPError):
            alice.get(f"/v2/local/tier/blobs/{digest}").read()
        deadline = time.monotonic() + 10
        while alice.get(f"/v2/local/tier/blobs/{digest}").status_code != 404:
            assert time.monotonic() < deadline, "the damaged blob is still served"
            time.sleep(0.1)
        tier = edge.settings.disk_cache_path / "blobs" / "sha256" / digest[7:]
        assert not tier.exists()


def test_an_older_record_is_verified_before_its_copy_is_shared_with_another_project(
    bucket_edge: EdgeServer, s3_server: S3Server, s3_settings: S3Settings
) -> None:
    """Records written before parts had keys of their own may have been overwritten: the
    first push of the same digest elsewhere re-hashes the copy and replaces a bad one."""
    data = os.urandom(MIB)
    digest = sha256(data)
    parsed = Digest.parse(digest)
    extent = "extents/00000000000000000000000000000000/0000000000000000"
    write(s3_server, s3_settings.bucket, extent, os.urandom(len(data)))
    record = json.dumps({"size": len(data), "extents": [[extent, len(data)]]}).encode()
    write(
        s3_server,
        s3_settings.bucket,
        layout.blob(parsed),
        record,
        metadata={"seawall-extents": "1", "seawall-size": str(len(data))},
    )
    link = str(len(data)).encode()
    write(s3_server, s3_settings.bucket, layout.layer_link("local/old", parsed), link)
    write(s3_server, s3_settings.bucket, layout.project_blob("local", parsed), link)

    with _client(bucket_edge) as alice:
        assert (
            alice.post("/v2/private/new/blobs/uploads/", params={"digest": digest}, content=data).status_code
            == 201
        )
        assert BLOB_CORRUPTIONS.labels("link")._value.get() >= 1
        assert alice.get(f"/v2/private/new/blobs/{digest}").content == data
        # The repository that linked the bad copy now reads the good one as well.
        assert alice.get(f"/v2/local/old/blobs/{digest}").content == data
