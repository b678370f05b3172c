"""Soak: many clients doing mixed manifest and blob GETs against an edge process, with no errors.

The suite runs the short one (100 clients, 20 s). `make soak` runs the long one (200 clients,
60 s) and also bounds the edge's memory growth; both check that the edge's open files go back
to where they were once the clients have left. Sizes come from SEAWALL_SOAK_CLIENTS,
SEAWALL_SOAK_SECONDS and SEAWALL_SOAK_MAX_RSS_GROWTH (a fraction; unset: not checked).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from services.processes import ManagedProcess, free_port, port_open, wait_until
from shared.settings import S3Settings
from tests.fixtures.edge import USERS
from tests.fixtures.proxy import StackFactory
from tests.support.images import OCI_MANIFEST, make_image, make_layer
from tests.support.processes import connections_by_remote_port
from tests.support.seed import push_image

CLIENTS = int(os.environ.get("SEAWALL_SOAK_CLIENTS", "100"))
SECONDS = float(os.environ.get("SEAWALL_SOAK_SECONDS", "20"))
MAX_RSS_GROWTH = os.environ.get("SEAWALL_SOAK_MAX_RSS_GROWTH")


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# A file or two opened or closed around the measurement (a log rotation, a timer) is noise;
# a leak grows with every request.
FILE_SLACK = 4


def _pool_ports(redis_url: str, s3: S3Settings) -> dict[str, int]:
    return {"redis": int(redis_url.rsplit(":", 1)[1].split("/")[0]), "s3": int(s3.endpoint.rsplit(":", 1)[1])}


def _settled_files(pid: int, pools: dict[str, int]) -> int:
    """Open files but the pooled connections to Redis and S3 (bounded, and checked on their
    own), once the clients' connections are closed: the fewest seen over 3 s."""
    counts = []
    for _ in range(6):
        time.sleep(0.5)
        peers = connections_by_remote_port(pid)
        counts.append(_open_files(pid) - sum(peers.get(port, 0) for port in pools.values()))
    return min(counts)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _load(urls: list[str], clients: int, seconds: float) -> dict[str, object]:
    argv = [
        sys.executable, "-m", "bench.loadgen", "get", *urls,
        "-c", str(clients), "--duration", str(seconds), "-H", f"Accept: {OCI_MANIFEST}",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=True)
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.fixture
def edge_process(cache_stack: StackFactory, tmp_path: Path) -> Iterator[tuple[ManagedProcess, str, str]]:
    """An edge in a process of its own (its files and memory are its own), beside a cache stack."""
    stack = cache_stack(tag_ttl="1h")
    port, metrics = free_port(), free_port()
    env = {
        **os.environ,
        "SEAWALL_LISTEN": f"127.0.0.1:{port}",
        "SEAWALL_METRICS_LISTEN": f"127.0.0.1:{metrics}",
        "SEAWALL_DATA_DIR": str(tmp_path / "soak-edge"),
        "SEAWALL_LOG_LEVEL": "warning",
    }
    argv = [sys.executable, "-m", "services.edge", "--config", str(stack.config_path)]
    edge = ManagedProcess("edge", argv, tmp_path / "soak-edge.log", env)
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 30, "soak edge listening")
        yield edge, f"http://127.0.0.1:{port}", stack.edge.url
    finally:
        edge.stop()


def test_mixed_gets_from_many_clients_all_succeed_and_leave_no_files_open(
    edge_process: tuple[ManagedProcess, str, str],
    distribution: object,
    repo_name: Callable[[], str],
    redis_url: str,
    s3_settings: S3Settings,
) -> None:
    edge, url, filler = edge_process
    hosted = make_image([make_layer(size=1_000_000, seed="soak-hosted")], label="soak")
    push_image(url, "local/soak", hosted, "v1", auth=("alice", USERS["alice"]))
    name = repo_name()
    cached = make_image([make_layer(size=1_000_000, seed=f"soak-{name}")], label=name)
    push_image(distribution.url, name, cached, "latest")  # type: ignore[attr-defined]
    # Bring the proxy image into the cache (a worker fills its blobs), so the soak reads hits.
    with httpx.Client(base_url=filler, timeout=60) as client:
        assert client.get(f"/v2/hub/{name}/manifests/latest", headers={"Accept": OCI_MANIFEST}).is_success
        for digest, data in cached.blobs.items():
            assert client.get(f"/v2/hub/{name}/blobs/{digest}").content == data
    urls = [
        f"{url}/v2/local/soak/manifests/v1",
        *(f"{url}/v2/local/soak/blobs/{digest}" for digest in hosted.blobs),
        f"{url}/v2/hub/{name}/manifests/latest",
        f"{url}/v2/hub/{name}/blobs/{list(cached.blobs)[1]}",
    ]
    # Two halves at full concurrency. The first fills what the edge keeps for the rest of
    # its life (its bounded pools of storage and Redis connections, threads, caches): the
    # baseline is taken after it. After the second, nothing may have grown past it.
    first = _load(urls, CLIENTS, SECONDS / 2)
    assert first["errors"] == 0, (first["error_samples"], first["statuses"])
    pools = _pool_ports(redis_url, s3_settings)
    files_before, rss_before = _settled_files(edge.pid, pools), _rss_bytes(edge.pid)

    second = _load(urls, CLIENTS, SECONDS / 2)

    for result in (first, second):
        assert result["errors"] == 0, (result["error_samples"], result["statuses"])
        assert set(result["statuses"]) == {"200"}, result  # type: ignore[arg-type]
        assert int(result["requests"]) > CLIENTS  # type: ignore[call-overload]
    assert edge.running(), edge.log_tail()
    files_after = _settled_files(edge.pid, pools)
    peers = connections_by_remote_port(edge.pid)
    assert files_after <= files_before + FILE_SLACK, (
        f"{files_after} files open, {files_before} before: {peers}"
    )
    # The connection pools stay within their bounds (two S3 clients of 64 connections each).
    assert peers.get(pools["s3"], 0) <= 2 * 64, peers
    assert peers.get(pools["redis"], 0) <= CLIENTS, peers
    if MAX_RSS_GROWTH is not None:
        growth = _rss_bytes(edge.pid) / rss_before - 1
        assert growth < float(MAX_RSS_GROWTH), f"edge RSS grew {growth:.0%} during the soak"
    assert "Traceback" not in edge.log_tail(500)
