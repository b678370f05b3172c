"""The edge's local disk tier: a blob read once from the bucket is then sent from a local file
(with sendfile, under both event loops the edge runs on, or copied), with the same headers,
ranges and access checks as before."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.settings import S3Settings
from tests.fixtures.edge import USERS, EdgeServer, build_settings
from tests.fixtures.proxy import wait_for
from tests.support.images import random_bytes, sha256

MIB = 1024 * 1024
ALICE = ("alice", USERS["alice"])
BOB = ("bob", USERS["bob"])
# What a blob response carries, whichever tier it came from.
BLOB_HEADERS = [
    "Docker-Content-Digest",
    "ETag",
    "Accept-Ranges",
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Cache-Control",
]


class UvloopEdgeServer(EdgeServer):
    """The edge on uvloop, as `python -m services.edge` runs it."""

    def __init__(self, settings: Any) -> None:
        uvloop = pytest.importorskip("uvloop")
        super().__init__(settings)
        self._loop.close()
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edge", daemon=True)


EdgeStarter = Callable[..., EdgeServer]


@pytest.fixture(params=["asyncio", "uvloop", "uvloop-copy", "uvloop-auto"])
def start_edge(
    request: pytest.FixtureRequest,
    redis_url: str,
    s3_settings: S3Settings,
    user_hashes: dict[str, str],
    tmp_path: Path,
) -> Iterator[EdgeStarter]:
    """Start edges whose disk tier lives under this test's tmp_path; `-copy`: without
    sendfile; `-auto`: the default, which copies to these loopback clients."""
    server_class = UvloopEdgeServer if request.param.startswith("uvloop") else EdgeServer
    started: list[EdgeServer] = []

    def start(**overrides: Any) -> EdgeServer:
        overrides.setdefault("data_dir", tmp_path)
        overrides["disk_cache"] = {
            "sendfile": {"copy": False, "auto": "auto"}.get(request.param.rpartition("-")[2], True),
            **overrides.get("disk_cache", {}),
        }
        settings = build_settings(redis_url, s3_settings, user_hashes, **overrides)
        server = server_class(settings).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def push_blob(edge: EdgeServer, repo: str, data: bytes) -> str:
    digest = sha256(data)
    with httpx.Client(base_url=edge.url, auth=ALICE, timeout=60) as http:
        response = http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data)
    assert response.status_code == 201, response.text
    return digest


def get(
    edge: EdgeServer, path: str, *, method: str = "GET", auth: Any = None, **headers: str
) -> httpx.Response:
    with httpx.Client(base_url=edge.url, auth=auth, timeout=60) as http:
        return http.request(method, path, headers=headers)


def metric(edge: EdgeServer, name: str, labels: str = "") -> float:
    assert edge.metrics_url is not None
    text = httpx.get(f"{edge.metrics_url}/metrics", timeout=60).text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} is not exported"
    return float(match[1])


def cache_file(tmp_path: Path, digest: str) -> Path:
    algorithm, hex_digest = digest.split(":")
    return tmp_path / "cache" / "blobs" / algorithm / hex_digest


def cached(edge: EdgeServer, tmp_path: Path, repo: str, data: bytes) -> str:
    """Push `data` and read it once, so that it lands in the disk tier."""
    digest = push_blob(edge, repo, data)
    assert get(edge, f"/v2/{repo}/blobs/{digest}", auth=ALICE).content == data
    file = cache_file(tmp_path, digest)
    wait_for(file.exists, 10, "the blob in the disk tier")
    return digest


def blob_headers(response: httpx.Response) -> dict[str, str | None]:
    return {name: response.headers.get(name) for name in BLOB_HEADERS}


def test_the_second_get_is_sent_from_the_disk_file(start_edge: EdgeStarter, tmp_path: Path) -> None:
    edge = start_edge()
    data = random_bytes(3 * MIB + 17, "second-get")
    digest = push_blob(edge, "local/app", data)
    path = f"/v2/local/app/blobs/{digest}"
    misses = metric(edge, "seawall_disk_cache_misses_total")

    first = get(edge, path)
    assert first.status_code == 200
    assert first.content == data
    assert metric(edge, "seawall_disk_cache_misses_total") == misses + 1
    file = cache_file(tmp_path, digest)
    wait_for(file.exists, 10, "the blob in the disk tier")
    assert file.read_bytes() == data

    hits = metric(edge, "seawall_disk_cache_hits_total")
    served = metric(edge, "seawall_bytes_served_total", '{kind="blob",project="local"}')
    second = get(edge, path)
    assert second.status_code == 200
    assert second.content == data
    assert blob_headers(second) == blob_headers(first)
    assert metric(edge, "seawall_disk_cache_hits_total") == hits + 1
    assert metric(edge, "seawall_bytes_served_total", '{kind="blob",project="local"}') == served + len(data)
    assert metric(edge, "seawall_disk_cache_bytes") == len(data)

    # The bytes really come from the file: the tier trusts what it verified when writing.
    file.write_bytes(data[::-1])
    assert get(edge, path).content == data[::-1]


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-0", 0, 0),
        ("bytes=1000-2099999", 1000, 2099999),
        ("bytes=3000000-", 3000000, 3 * MIB + 16),
        ("bytes=-500", 3 * MIB + 17 - 500, 3 * MIB + 16),
        ("bytes=5-99999999", 5, 3 * MIB + 16),
    ],
)
def test_ranges_from_the_disk_file_are_byte_exact(
    start_edge: EdgeStarter, tmp_path: Path, header: str, start: int, end: int
) -> None:
    edge = start_edge()
    data = random_bytes(3 * MIB + 17, "ranges")
    digest = cached(edge, tmp_path, "local/app", data)
    hits = metric(edge, "seawall_disk_cache_hits_total")
    response = get(edge, f"/v2/local/app/blobs/{digest}", Range=header)
    assert response.status_code == 206
    assert response.content == data[start : end + 1]
    assert response.headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}"
    assert response.headers["Content-Length"] == str(end - start + 1)
    assert response.headers["Docker-Content-Digest"] == digest
    assert response.headers["ETag"] == f'"{digest}"'
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert metric(edge, "seawall_disk_cache_hits_total") == hits + 1


def test_a_bad_range_of_a_cached_blob_is_range_invalid(start_edge: EdgeStarter, tmp_path: Path) -> None:
    edge = start_edge()
    data = random_bytes(MIB, "bad-range")
    digest = cached(edge, tmp_path, "local/app", data)
    for header in ("bytes=2000000-", "bytes=0-1,5-9", "lines=0-1"):
        response = get(edge, f"/v2/local/app/blobs/{digest}", Range=header)
        assert response.status_code == 416, header
        assert response.json()["errors"][0]["code"] == "RANGE_INVALID"
        assert response.headers["Content-Range"] == f"bytes */{len(data)}"


def test_head_of_a_cached_blob(start_edge: EdgeStarter, tmp_path: Path) -> None:
    edge = start_edge()
    data = random_bytes(MIB, "head")
    digest = cached(edge, tmp_path, "local/app", data)
    response = get(edge, f"/v2/local/app/blobs/{digest}", method="HEAD")
    assert response.status_code == 200
    assert response.content == b""
    assert blob_headers(response) == {
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        "Content-Length": str(len(data)),
        "Content-Range": None,
        "Cache-Control": "max-age=31536000",
    }


def test_a_cache_file_deleted_underneath_is_served_from_the_bucket(
    start_edge: EdgeStarter, tmp_path: Path
) -> None:
    edge = start_edge()
    data = random_bytes(2 * MIB, "deleted")
    digest = cached(edge, tmp_path, "local/app", data)
    file = cache_file(tmp_path, digest)
    file.unlink()
    misses = metric(edge, "seawall_disk_cache_misses_total")
    response = get(edge, f"/v2/local/app/blobs/{digest}")
    assert response.status_code == 200
    assert response.content == data
    assert metric(edge, "seawall_disk_cache_misses_total") == misses + 1
    wait_for(file.exists, 10, "the blob written to the disk tier again")
    assert file.read_bytes() == data


def test_a_cache_file_of_the_wrong_size_is_dropped_and_the_bucket_serves(
    start_edge: EdgeStarter, tmp_path: Path
) -> None:
    edge = start_edge()
    data = random_bytes(MIB, "wrong-size")
    digest = cached(edge, tmp_path, "local/app", data)
    file = cache_file(tmp_path, digest)
    file.write_bytes(data[:-1])
    response = get(edge, f"/v2/local/app/blobs/{digest}")
    assert response.content == data
    wait_for(lambda: file.exists() and file.stat().st_size == len(data), 10, "the blob written again")


def test_the_disk_tier_never_widens_access(start_edge: EdgeStarter, tmp_path: Path) -> None:
    edge = start_edge()
    data = random_bytes(MIB, "access")
    digest = cached(edge, tmp_path, "local/app", data)
    assert push_blob(edge, "private/secret", data) == digest
    path = f"/v2/private/secret/blobs/{digest}"
    assert get(edge, path).status_code == 401
    hits = metric(edge, "seawall_disk_cache_hits_total")
    allowed = get(edge, path, auth=BOB)
    assert allowed.status_code == 200
    assert allowed.content == data
    assert metric(edge, "seawall_disk_cache_hits_total") == hits + 1
    # A repository that never linked the blob does not get it because a file is on disk.
    unlinked = get(edge, f"/v2/local/other/blobs/{digest}")
    assert unlinked.status_code == 404
    assert unlinked.json()["errors"][0]["code"] == "BLOB_UNKNOWN"


def test_concurrent_gets_of_an_uncached_blob_write_it_once(start_edge: EdgeStarter, tmp_path: Path) -> None:
    edge = start_edge()
    data = random_bytes(8 * MIB, "concurrent")
    digest = push_blob(edge, "local/app", data)
    stored = '{result="stored"}'
    before = metric(edge, "seawall_disk_cache_writes_total", stored)
    barrier = threading.Barrier(8)
    bodies: list[bytes] = []

    def fetch() -> None:
        with httpx.Client(base_url=edge.url, timeout=60) as http:
            barrier.wait()
            bodies.append(http.get(f"/v2/local/app/blobs/{digest}").content)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert bodies == [data] * 8
    wait_for(cache_file(tmp_path, digest).exists, 10, "the blob in the disk tier")
    assert metric(edge, "seawall_disk_cache_writes_total", stored) == before + 1
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_a_blob_too_big_for_the_tier_stays_in_the_bucket(start_edge: EdgeStarter, tmp_path: Path) -> None:
    edge = start_edge(disk_cache={"max_bytes": 4 * MIB, "max_blob_fraction": 0.5})
    data = random_bytes(3 * MIB, "too-big")
    digest = push_blob(edge, "local/app", data)
    for _ in range(2):
        assert get(edge, f"/v2/local/app/blobs/{digest}").content == data
    small = random_bytes(MIB, "fits")
    cached(edge, tmp_path, "local/app", small)
    assert not cache_file(tmp_path, digest).exists()


def test_with_the_tier_off_nothing_is_written(start_edge: EdgeStarter, tmp_path: Path) -> None:
    edge = start_edge(disk_cache={"max_bytes": 0})
    data = random_bytes(MIB, "off")
    digest = push_blob(edge, "local/app", data)
    for _ in range(2):
        assert get(edge, f"/v2/local/app/blobs/{digest}").content == data
    time.sleep(0.5)
    assert not (tmp_path / "cache" / "blobs").exists()
    assert not (tmp_path / "cache" / "tmp").exists()


def read_response(stream: Any, *, piece: int | None = None) -> tuple[bytes, dict[str, str], bytes]:
    """One HTTP/1.1 response (with Content-Length) from a buffered reader; a body read in
    `piece`-sized reads with a pause between them, if given, like a slow client."""
    status = stream.readline()
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, value = line.decode().split(":", 1)
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    if piece is None:
        return status, headers, stream.read(length)
    body = bytearray()
    while len(body) < length:
        body += stream.read(min(piece, length - len(body)))
        time.sleep(0.001)
    return status, headers, bytes(body)


def test_pipelined_gets_from_a_client_that_reads_late_are_whole(
    start_edge: EdgeStarter, tmp_path: Path
) -> None:
    edge = start_edge()
    data = random_bytes(16 * MIB, "pipelined")
    digest = cached(edge, tmp_path, "local/app", data)
    # Not read yet, so not on disk: the first answer comes from the bucket.
    big = random_bytes(8 * MIB, "pipelined-big")
    big_digest = push_blob(edge, "local/app", big)
    host, port = edge.address.rsplit(":", 1)

    def request(digest: str, extra: str = "") -> bytes:
        return f"GET /v2/local/app/blobs/{digest} HTTP/1.1\r\nHost: {edge.address}\r\n{extra}\r\n".encode()

    with socket.create_connection((host, int(port))) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        # All requests at once, and the answers read slowly: the tail of the first body
        # (sent from the bucket) may still be in the edge's transport buffer when the next
        # response, from the disk file, starts, and the file is sent into a full socket.
        client.sendall(request(big_digest) + request(digest) + request(digest, "Range: bytes=7-\r\n"))
        with client.makefile("rb") as stream:
            responses = [read_response(stream, piece=64 * 1024) for _ in range(3)]
    assert [status.split()[1] for status, _, _ in responses] == [b"200", b"200", b"206"]
    assert [body for _, _, body in responses] == [big, data, data[7:]]
    assert responses[2][1]["content-range"] == f"bytes 7-{len(data) - 1}/{len(data)}"
