"""Connection limits on the edge: header, body and keep-alive timeouts, the per-client
connection cap, and the address `/metrics` is served on.

Slow and stalled clients are played with raw sockets against a real edge. The edge runs in
this process, so its open connections are counted in /proc/self/fd: the sockets whose local
port is the edge's port are the edge's side of each connection.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.fixtures.edge import USERS, EdgeFactory, EdgeLoop, EdgeServer

ALICE = ("alice", USERS["alice"])
ALICE_HEADER = "Basic " + base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()
PARTIAL_REQUEST = b"GET /v2/ HTTP/1.1\r\nHost: seawall\r\nUser-Agent: slow"
FULL_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: seawall\r\n\r\n"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(params=["asyncio", "uvloop"])
def edge_loop(request: pytest.FixtureRequest) -> EdgeLoop:
    """This module's edges run on asyncio and on uvloop (which `python -m services.edge` runs):
    their transports and TLS are different code."""
    loop: EdgeLoop = request.param
    return loop


def edge_connection_fds(port: int) -> int:
    """How many accepted connections on `port` this process holds open (the edge's side)."""
    inodes: set[str] = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows)
                for row in rows:
                    fields = row.split()
                    local_port = int(fields[1].rsplit(":", 1)[1], 16)
                    listening = fields[3] == "0A"
                    if local_port == port and not listening:
                        inodes.add(fields[9])
        except FileNotFoundError:
            continue
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            count += 1
    return count


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def connect(edge: EdgeServer) -> socket.socket:
    host, port = edge.address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


@contextmanager
def connections(edge: EdgeServer, count: int) -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            opened.append(connect(edge))
        yield opened
    finally:
        for sock in opened:
            sock.close()


def closed_by_edge(sock: socket.socket, within: float) -> bool:
    """True when the edge closes the connection (EOF or reset) within `within` seconds,
    without having answered anything."""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            return False
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return True
        assert not data, f"the edge answered instead of closing: {data[:200]!r}"
        return True
    return False


def exchange(sock: socket.socket, request: bytes) -> http.client.HTTPResponse:
    """Send a whole request on an open connection and read its response."""
    sock.sendall(request)
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    return response


def read_response(sock: socket.socket, timeout: float) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.read()


def start_upload(edge: EdgeServer, repo: str) -> str:
    with httpx.Client(base_url=edge.url, auth=ALICE, timeout=30) as client:
        started = client.post(f"/v2/{repo}/blobs/uploads/")
    assert started.status_code == 202, started.text
    return str(started.headers["Location"])


def patch_head(location: str, size: int) -> bytes:
    """The head of alice's PATCH of bytes 0 to size - 1 of an upload, sent raw."""
    return (
        f"PATCH {location} HTTP/1.1\r\nHost: seawall\r\nAuthorization: {ALICE_HEADER}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n"
        f"Content-Range: 0-{size - 1}\r\n\r\n"
    ).encode()


# --------------------------------------------------------------------------- header timeout


def test_connections_holding_partial_headers_are_closed_after_header_timeout(
    edge_factory: EdgeFactory,
) -> None:
    edge = edge_factory(limits={"header_timeout": "1s"})
    port = edge.settings.listen_port
    # Two waves of slow clients: the edge's open connections stay bounded, wave after wave.
    for _ in range(2):
        with connections(edge, 200) as slow:
            for sock in slow:
                sock.sendall(PARTIAL_REQUEST)
            for sock in slow:
                assert closed_by_edge(sock, within=10), "a connection holding partial headers stayed open"
            # Our side of each connection is still open: only the edge's side is gone.
            assert edge_connection_fds(port) <= 2
    assert httpx.get(f"{edge.url}/healthz", timeout=10).status_code == 200


def test_headers_trickled_byte_by_byte_are_cut_at_header_timeout(edge_factory: EdgeFactory) -> None:
    edge = edge_factory(limits={"header_timeout": "1s"})
    with connect(edge) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: seawall\r\nX-Slow: ")
        started = time.monotonic()
        closed_after = None
        # A byte every 0.2 s for up to 10 s: data keeps arriving, but the headers never end.
        while time.monotonic() - started < 10:
            readable, _, _ = select.select([sock], [], [], 0.2)
            try:
                if readable:
                    assert sock.recv(65536) == b""
                    closed_after = time.monotonic() - started
                    break
                sock.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None, "the edge kept reading headers for 10 s"
    assert closed_after < 5


def test_kept_alive_connection_idles_under_keepalive_then_gets_header_timeout(
    edge_factory: EdgeFactory,
) -> None:
    edge = edge_factory(limits={"header_timeout": "1s", "keepalive_timeout": "30s"})
    with connect(edge) as sock:
        assert exchange(sock, FULL_REQUEST).status == 200
        # Idle between requests is the keep-alive timeout's business, not the header timeout's.
        time.sleep(2)
        assert exchange(sock, FULL_REQUEST).status == 200
        # Once the next request has started, its headers must arrive within header_timeout.
        sock.sendall(PARTIAL_REQUEST)
        assert closed_by_edge(sock, within=6)


def test_idle_kept_alive_connection_is_closed_after_keepalive_timeout(edge_factory: EdgeFactory) -> None:
    edge = edge_factory(limits={"keepalive_timeout": "2s"})
    with connect(edge) as sock:
        assert exchange(sock, FULL_REQUEST).status == 200
        assert closed_by_edge(sock, within=8)


# --------------------------------------------------------------------------- body idle timeout


def test_stalled_patch_body_is_cut_and_leaves_the_upload_where_it_was(edge_factory: EdgeFactory) -> None:
    edge = edge_factory(limits={"body_idle_timeout": "1s"})
    location = start_upload(edge, "local/stalled")
    chunk = os.urandom(1000)
    with connect(edge) as sock:
        sock.sendall(patch_head(location, len(chunk)) + chunk[:100])
        # The client sends nothing more: the edge gives up on the body and says so.
        status, body = read_response(sock, timeout=15)
    assert status == 400, body
    assert b'"code": "BLOB_UPLOAD_INVALID"' in body or b'"code":"BLOB_UPLOAD_INVALID"' in body

    with httpx.Client(base_url=edge.url, auth=ALICE, timeout=30) as client:
        state = client.get(location)
        assert state.status_code == 204, state.text
        assert state.headers["Range"] == "0-0"
        # Offset 0 exactly: the whole chunk from byte 0 is accepted again.
        retried = client.patch(
            location,
            content=chunk,
            headers={"Content-Type": "application/octet-stream", "Content-Range": "0-999"},
        )
        assert retried.status_code == 202, retried.text
        assert retried.headers["Range"] == "0-999"


def test_a_slow_but_steady_body_outlasts_both_timeouts(edge_factory: EdgeFactory) -> None:
    edge = edge_factory(limits={"header_timeout": "1s", "body_idle_timeout": "2s"})
    location = start_upload(edge, "local/steady")
    chunk = os.urandom(1000)
    with connect(edge) as sock:
        sock.sendall(patch_head(location, len(chunk)))
        # 4 s in all, longer than either timeout, but never 2 s without a byte.
        for start in range(0, 1000, 100):
            time.sleep(0.4)
            sock.sendall(chunk[start : start + 100])
        status, body = read_response(sock, timeout=15)
    assert status == 202, body
    with httpx.Client(base_url=edge.url, auth=ALICE, timeout=30) as client:
        assert client.get(location).headers["Range"] == "0-999"


def test_stalled_monolithic_upload_stores_nothing(edge_factory: EdgeFactory) -> None:
    edge = edge_factory(limits={"body_idle_timeout": "1s"})
    data = os.urandom(1000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with connect(edge) as sock:
        sock.sendall(
            f"POST /v2/local/stalled/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: seawall\r\n"
            f"Authorization: {ALICE_HEADER}\r\nContent-Type: application/octet-stream\r\n"
            "Content-Length: 1000\r\n\r\n".encode()
            + data[:500]
        )
        status, body = read_response(sock, timeout=15)
    assert status == 400, body
    with httpx.Client(base_url=edge.url, auth=ALICE, timeout=30) as client:
        assert client.head(f"/v2/local/stalled/blobs/{digest}").status_code == 404


# --------------------------------------------------------------------------- per-client cap


def test_connections_past_the_per_client_cap_are_closed_at_once(edge_factory: EdgeFactory) -> None:
    edge = edge_factory(limits={"max_connections_per_client": 3, "header_timeout": "60s"})
    port = edge.settings.listen_port
    with connections(edge, 3) as held:
        wait_for(lambda: edge_connection_fds(port) == 3, 10, "three accepted connections")
        with connect(edge) as extra:
            extra.sendall(FULL_REQUEST)
            assert closed_by_edge(extra, within=5), "a fourth connection from the same client was served"
        # The three within the cap are served as usual.
        for sock in held:
            assert exchange(sock, FULL_REQUEST).status == 200
        # A closed connection gives its slot back.
        held[0].close()
        wait_for(lambda: edge_connection_fds(port) == 2, 10, "the closed connection released")
        with connect(edge) as replacement:
            assert exchange(replacement, FULL_REQUEST).status == 200


# --------------------------------------------------------------------------- /metrics


def test_metrics_are_served_on_metrics_listen_not_on_the_registry_port(edge: EdgeServer) -> None:
    assert httpx.get(f"{edge.url}/healthz", timeout=10).status_code == 200
    on_registry = httpx.get(f"{edge.url}/metrics", timeout=10)
    assert on_registry.status_code == 404
    assert on_registry.json()["errors"][0]["code"] == "NOT_FOUND"

    assert edge.metrics_url is not None
    scraped = httpx.get(f"{edge.metrics_url}/metrics", timeout=10)
    assert scraped.status_code == 200
    assert "seawall_request_duration_seconds" in scraped.text
    # The metrics address serves metrics and nothing else.
    assert httpx.get(f"{edge.metrics_url}/v2/", timeout=10).status_code == 404


def test_metrics_on_the_registry_port_when_configured(edge_factory: EdgeFactory) -> None:
    edge = edge_factory(metrics_on_registry_port=True)
    scraped = httpx.get(f"{edge.url}/metrics", timeout=10)
    assert scraped.status_code == 200
    assert "seawall_request_duration_seconds" in scraped.text
    assert edge.metrics_url is not None
    assert httpx.get(f"{edge.metrics_url}/metrics", timeout=10).status_code == 200


def test_no_metrics_address_when_metrics_listen_is_null(edge_factory: EdgeFactory) -> None:
    edge = edge_factory(metrics_listen=None)
    assert edge.metrics_url is None
    assert httpx.get(f"{edge.url}/metrics", timeout=10).status_code == 404
